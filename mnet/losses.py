"""Losses: the per-example loss, its batch mean, and the hand-derived gradient of the mean.

Each loss object has

* ``per_example(outputs, targets) -> (batch,)``: the losses ``l_b``;
* ``value(outputs, targets)``: their mean over the batch;
* ``per_example_grad(outputs, targets)``: row ``b`` is ``d l_b / d outputs_b``, derived by hand;
* ``grad(outputs, targets)``: ``d value / d outputs = per_example_grad / batch``, shape of ``outputs``;
* ``hessian_sqrt(outputs, targets)``: ``S`` of shape ``(C, batch, *output)`` with ``sum_c S[c, b] S[c, b]^T = H_b``,
  the Hessian of ``l_b`` with respect to example ``b``'s outputs (not divided by the batch: curvature drivers
  take the batch mean themselves);
* ``hessian_vector(outputs, targets, v)``: ``d^2 value / d outputs^2`` applied to ``v`` (shape of ``outputs``),
  without forming the Hessian: the step from an output tangent to the cotangent's tangent in curvature products;
* ``sampled_hessian_sqrt(outputs, targets, key, samples)``: ``(samples, batch, *output)`` columns drawn from the
  loss's own predictive distribution, so that ``E[sum_c S[c, b] S[c, b]^T] = H_b``.

Both cross-entropies take logits (not probabilities) and use forms that stay finite for logits of any size:
log-sum-exp with the maximum subtracted, and ``softplus(z) = logaddexp(z, 0)``.

Class labels outside ``[0, classes)`` are refused with a :class:`mnet.errors.LossError` naming the label when the
labels are concrete arrays. Under ``jax.jit`` values cannot be checked, so such an example's loss and its gradient
row are NaN instead (never a wrapped-around or silently dropped label): a training run then stops at once with
:class:`mnet.errors.DivergenceError`, and :func:`mnet.fit` checks its data's labels before it starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from mnet import activations
from mnet.errors import LossError, SettingError
from mnet.labels import check_labels, in_range

Array = jax.Array


def with_mask(loss: Loss, targets: Array, mask: Array | None) -> tuple[Loss, Array]:
    """``(loss, targets)`` that leave out the padded positions of ``mask`` (``(batch, T)``, True at tokens); both
    unchanged for ``mask=None``. What every quantity's driver does with its targets first, so it is also where an
    empty batch is refused (at trace time): a loss is a mean over the batch, and the mean of no examples is none."""
    if jnp.ndim(targets) and jnp.shape(targets)[0] == 0:
        raise LossError(
            f"{loss!r}: the batch is empty (targets of shape {jnp.shape(targets)}); give at least one example"
        )
    return (loss, targets) if mask is None else loss.masked(targets, mask)


def _units(outputs: Array) -> int:
    """Number of output units per example (all non-batch axes)."""
    return math.prod(outputs.shape[1:])


class Loss:
    """Base class: subclasses define ``per_example`` and ``grad``; ``value`` is the batch mean.

    Everything else that depends on which loss this is lives here too, so that training, the checks and the
    Laplace approximation never ask which loss they hold: ``kind`` (``"regression"``, ``"classification"``, or
    None for a loss without a likelihood), :meth:`accuracy`, :meth:`check_targets`, :meth:`random_targets`,
    :meth:`predictive`, :meth:`negative_log_likelihood_affine` and :meth:`likelihood_weights`."""

    name = "loss"
    #: ``"regression"`` or ``"classification"`` for a loss that is a negative log-likelihood (up to an affine map);
    #: None for any other.
    kind: str | None = None

    def value(self, outputs: Array, targets: Array) -> Array:
        """The mean over the batch of the per-example losses (a scalar)."""
        return jnp.mean(self.per_example(outputs, targets))

    def per_example(self, outputs: Array, targets: Array) -> Array:
        raise NotImplementedError

    def per_example_grad(self, outputs: Array, targets: Array) -> Array:
        raise NotImplementedError

    def grad(self, outputs: Array, targets: Array) -> Array:
        """``d value / d outputs``: each example's own gradient, divided by the batch size (the mean's weight)."""
        return self.per_example_grad(outputs, targets) / outputs.shape[0]

    def hessian_sqrt(self, outputs: Array, targets: Array) -> Array:
        """``S``, ``(C, batch, *output)``: ``H_b = sum_c S[c, b] S[c, b]^T`` exactly."""
        raise LossError(f"{self.name}: this loss has no Hessian square root (hessian_sqrt), which curvature needs")

    def hessian_vector(self, outputs: Array, targets: Array, v: Array) -> Array:
        """``(d^2 value / d outputs^2) v``: example ``b``'s row is ``H_b v_b / batch``. By default from the square
        root, ``sum_c S[c, b] <S[c, b], v_b>``; the built-in losses apply ``H_b`` in closed form."""
        S = self.hessian_sqrt(outputs, targets)
        columns = S.reshape(S.shape[:2] + (-1,))
        weights = jnp.einsum("cbk,bk->cb", columns, v.reshape(v.shape[0], -1))
        return jnp.einsum("cb,cbk->bk", weights, columns).reshape(v.shape) / outputs.shape[0]

    def sampled_hessian_sqrt(self, outputs: Array, targets: Array, key: Array, samples: int) -> Array:
        """``(samples, batch, *output)``: each column an independent draw whose outer product is unbiased for
        ``H_b``, divided by ``sqrt(samples)`` so that the sum over columns is the average of the draws."""
        raise LossError(f"{self.name}: this loss has no sampled Hessian square root (sampled_hessian_sqrt)")

    def accuracy(self, outputs: Array, targets: Array) -> Array:
        """The fraction of examples classified right; NaN for a loss that is not a classifier's."""
        return jnp.asarray(jnp.nan)

    def check_targets(self, outputs_shape: tuple[int, ...], targets: Any, where: str) -> None:
        """Refuse concrete targets that the outputs cannot hold (inside a jitted epoch they would only show as a NaN
        loss) with a :class:`mnet.errors.LossError` naming ``where``; by default every target is accepted."""

    def random_targets(self, outputs: Any, key: Array) -> Array:
        """Random targets this loss accepts for ``outputs`` (an array or a ``jax.ShapeDtypeStruct``): for checks."""
        return jax.random.normal(key, outputs.shape, outputs.dtype)

    def predictive(self, outputs: Array) -> Array:
        """The mean of the predictive distribution the loss is the negative log-likelihood of: the outputs for
        regression, the probabilities for classification."""
        return outputs

    def likelihood(self, where: str) -> str:
        """``kind``, or a :class:`mnet.errors.LossError` naming ``where`` for a loss that is no negative
        log-likelihood."""
        if self.kind is None:
            raise LossError(
                f"{where}: {self!r} has no known likelihood; supported: losses.mse (Gaussian), "
                "losses.softmax_cross_entropy (categorical), losses.sigmoid_binary_cross_entropy (Bernoulli)"
            )
        return self.kind

    def negative_log_likelihood_affine(self, units: int, sigma_noise: float) -> tuple[float, float]:
        """``(s, c)`` with ``-log p(t | f) = s * l + c`` for one example of ``units`` outputs, ``l`` this loss per
        example (``sigma_noise`` the Gaussian's standard deviation, for regression)."""
        raise LossError(f"{self!r}: " + self.likelihood("negative_log_likelihood_affine"))

    def likelihood_weights(self, outputs: Array, targets: Array, sigma_noise: float) -> tuple[Array, float]:
        """``(w, c)``, ``w`` of shape ``(batch,)``, with ``-log p(t_b | f_b) = w_b l_b + c`` for every example of the
        batch: what the Laplace approximation weighs each example's loss and curvature by. By default every example
        has the same weight, :meth:`negative_log_likelihood_affine`'s."""
        scale, constant = self.negative_log_likelihood_affine(_units(outputs), sigma_noise)
        return jnp.full(jnp.shape(outputs)[:1], scale, outputs.dtype), constant

    def masked(self, targets: Array, mask: Array) -> tuple[Loss, Array]:
        """The loss and targets that leave out the positions where ``mask`` (``(batch, T)`` booleans) is False.
        Only a loss over positions with labels can: see :class:`SoftmaxCrossEntropy`."""
        raise LossError(f"{self.name} has no positions to leave out: a padding mask needs softmax_cross_entropy")

    def predictive_negative_log_likelihood(self, predictive: Array, targets: Array) -> Array:
        """The mean over examples of ``-log p(t)`` under the predictive distribution given by its mean
        ``predictive`` (:meth:`predictive`'s output: probabilities for a classifier)."""
        raise LossError(f"{self!r}: no predictive negative log-likelihood")

    def __repr__(self) -> str:
        return f"losses.{self.name}"

    def _check_same_shape(self, outputs: Array, targets: Array) -> None:
        if outputs.ndim < 1 or tuple(outputs.shape) != tuple(targets.shape):
            raise LossError(
                f"{self.name}: targets must have the shape of the outputs, "
                f"got outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}"
            )


@dataclass(frozen=True, repr=False)
class MeanSquaredError(Loss):
    """``l_b = mean_j (o_bj - t_bj)^2`` per example; ``d l_b / d o_b = 2 (o_b - t_b) / units``."""

    kind = "regression"

    def negative_log_likelihood_affine(self, units: int, sigma_noise: float) -> tuple[float, float]:
        """A Gaussian of standard deviation ``sigma_noise`` per unit: ``-log p = units / (2 s^2) l + c``."""
        return units / (2 * sigma_noise**2), units / 2 * math.log(2 * math.pi * sigma_noise**2)

    name = "mse"

    def per_example(self, outputs: Array, targets: Array) -> Array:
        self._check_same_shape(outputs, targets)
        residual = (outputs - targets).reshape(outputs.shape[0], -1)
        return jnp.mean(residual * residual, axis=1)

    def per_example_grad(self, outputs: Array, targets: Array) -> Array:
        self._check_same_shape(outputs, targets)
        return (2 / _units(outputs)) * (outputs - targets)

    def hessian_sqrt(self, outputs: Array, targets: Array) -> Array:
        """``H_b = (2 / units) I``: column ``c`` is ``sqrt(2 / units) e_c``, the same for every example."""
        self._check_same_shape(outputs, targets)
        return _unit_columns(outputs, jnp.full(outputs.shape, math.sqrt(2 / _units(outputs)), outputs.dtype))

    def hessian_vector(self, outputs: Array, targets: Array, v: Array) -> Array:
        """``H_b = (2 / units) I``."""
        self._check_same_shape(outputs, targets)
        return (2 / (_units(outputs) * outputs.shape[0])) * v

    def sampled_hessian_sqrt(self, outputs: Array, targets: Array, key: Array, samples: int) -> Array:
        """``sqrt(2 / units) eps`` with ``eps ~ N(0, I)``: the gradient of ``l_b`` at a target drawn from the
        Gaussian predictive ``N(o_b, units / 2 I)``, whose outer product has mean ``(2 / units) I``."""
        self._check_same_shape(outputs, targets)
        eps = jax.random.normal(key, (samples, *outputs.shape), outputs.dtype)
        return eps * math.sqrt(2 / _units(outputs)) / math.sqrt(samples)


@dataclass(frozen=True, repr=False)
class SoftmaxCrossEntropy(Loss):
    """Softmax fused with cross-entropy, on logits ``z`` of shape ``(batch, classes)`` and integer labels
    ``(batch,)``; or, for sequence models, logits ``(batch, *positions, classes)`` and labels
    ``(batch, *positions)``, the example's loss the mean over its positions (as MSE averages over its units).

    Per example and position ``l = logsumexp(z) - z[y]``, with the row maximum subtracted inside the log-sum-exp.
    Its gradient is the classic fused form: ``d l / d z = softmax(z) - onehot(y)``, so
    ``d value / d z = (softmax(z) - onehot(y)) / (batch * positions)``, bounded for any logits.

    Padding. With ``ignore_index=i`` (a negative int; PyTorch's ``ignore_index``) a label ``i`` leaves its position
    out: the example's loss is the mean over its other positions, ``l_b = sum_t w_bt l_bt`` with
    ``w_bt = [y_bt != i] / n_b`` and ``n_b`` the example's labelled positions (an example with none has ``l_b = 0``
    and no gradient), and every derivative carries the same weights (the gradient ``w_bt (p - onehot)``, the
    Hessian's square root ``sqrt(w_bt)`` times each position's block). So a padded example has exactly the
    quantities it has alone, unpadded. Without ``ignore_index`` (the default, ``softmax_cross_entropy``) every
    negative label is an error. :meth:`masked` gives the loss and labels for a ``(batch, T)`` padding mask.
    """

    ignore_index: int | None = None

    def __post_init__(self):
        index = self.ignore_index
        if index is not None and (not isinstance(index, int) or isinstance(index, bool) or index >= 0):
            raise SettingError(f"SoftmaxCrossEntropy: ignore_index must be a negative int (a non-label), got {index!r}")

    def __repr__(self) -> str:
        return f"losses.{self.name}" + ("" if self.ignore_index is None else f"(ignore_index={self.ignore_index})")

    name = "softmax_cross_entropy"
    kind = "classification"

    def accuracy(self, logits: Array, labels: Array) -> Array:
        """The fraction of labelled positions (``ignore_index`` left out) whose largest logit is the label."""
        kept = self._kept(labels)
        hits = jnp.sum((jnp.argmax(logits, axis=-1) == labels) & kept)
        return hits / jnp.maximum(jnp.sum(kept), 1)

    def check_targets(self, outputs_shape: tuple[int, ...], labels: Any, where: str) -> None:
        check_labels(labels, outputs_shape[-1], where, self.ignore_index)

    def random_targets(self, logits: Any, key: Array) -> Array:
        if len(logits.shape) < 2 or logits.shape[-1] < 2:
            raise LossError(
                f"{self.name} needs outputs of shape (batch, classes) (or (batch, T, classes)) with at least 2 output "
                f"classes, the network gives {tuple(logits.shape)}"
            )
        return jax.random.randint(key, logits.shape[:-1], 0, logits.shape[-1])

    def predictive(self, logits: Array) -> Array:
        return jax.nn.softmax(logits, axis=-1)

    def negative_log_likelihood_affine(self, units: int, sigma_noise: float) -> tuple[float, float]:
        """Categorical: the loss of a flat output is the negative log-likelihood itself."""
        return 1.0, 0.0

    def likelihood_weights(self, outputs: Array, labels: Array, sigma_noise: float) -> tuple[Array, float]:
        """A sequence's log-likelihood is the sum over its labelled positions, its loss their mean: ``w_b = n_b``,
        the example's labelled positions (``ignore_index`` left out; 1 for a flat output)."""
        kept = self._kept(jnp.asarray(labels)).astype(outputs.dtype)
        return jnp.sum(kept.reshape(kept.shape[0], -1), axis=1), 0.0

    def predictive_negative_log_likelihood(self, probabilities: Array, labels: Array) -> Array:
        """The mean over examples of ``-log p(y_b)``, for a sequence the sum over its labelled positions."""
        tiny = jnp.finfo(probabilities.dtype).tiny
        labels = jnp.asarray(labels)
        kept = self._kept(labels)
        picked = jnp.take_along_axis(probabilities, jnp.where(kept, labels, 0)[..., None], axis=-1)[..., 0]
        each = jnp.where(kept, -jnp.log(jnp.maximum(picked, tiny)), 0)
        return jnp.mean(jnp.sum(each.reshape(each.shape[0], -1), axis=1))

    def _check(self, logits: Array, labels: Array) -> None:
        if logits.ndim < 2:
            raise LossError(f"{self.name}: expects logits of shape (batch, classes), got {tuple(logits.shape)}")
        if labels.shape != logits.shape[:-1]:
            expected = "(" + ", ".join(map(str, logits.shape[:-1])) + ("," if logits.ndim == 2 else "") + ")"
            raise LossError(f"{self.name}: expects integer labels of shape {expected}, got {tuple(labels.shape)}")
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise LossError(f"{self.name}: expects integer class ids, got labels of dtype {labels.dtype}")
        if not isinstance(labels, jax.core.Tracer):
            check_labels(labels, logits.shape[-1], self.name, self.ignore_index)

    @staticmethod
    def _positions(logits: Array) -> int:
        return math.prod(logits.shape[1:-1])

    def masked(self, targets: Array, mask: Array) -> tuple[Loss, Array]:
        mask = jnp.asarray(mask)
        if mask.dtype != bool or mask.shape != jnp.shape(targets):
            raise LossError(
                f"{self.name}: expects a boolean padding mask of the labels' shape {tuple(jnp.shape(targets))}, "
                f"got {mask.dtype} of shape {tuple(mask.shape)}"
            )
        index = -1 if self.ignore_index is None else self.ignore_index
        return SoftmaxCrossEntropy(ignore_index=index), jnp.where(mask, targets, index)

    def _kept(self, labels: Array) -> Array:
        return labels != self.ignore_index if self.ignore_index is not None else jnp.ones(labels.shape, bool)

    def _weights(self, labels: Array, dtype: Any) -> Array:
        """``w_bt = [y_bt != ignore_index] / n_b`` (``(batch, *positions)``; ``1 / positions`` when nothing is
        ignored)."""
        kept = self._kept(labels).astype(dtype)
        counts = jnp.sum(kept.reshape(labels.shape[0], -1), axis=1)
        return kept / jnp.maximum(counts, 1).reshape((-1,) + (1,) * (labels.ndim - 1))

    def per_example(self, logits: Array, labels: Array) -> Array:
        self._check(logits, labels)
        shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
        log_normaliser = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
        kept = self._kept(labels)
        picked = jnp.take_along_axis(shifted, jnp.where(kept, labels, 0)[..., None].astype(jnp.int32), axis=-1)[..., 0]
        losses = jnp.where(in_range(labels, logits.shape[-1], self.ignore_index), log_normaliser - picked, jnp.nan)
        weighted = jnp.where(kept, losses, 0) * self._weights(labels, losses.dtype)
        return jnp.sum(weighted.reshape(logits.shape[0], -1), axis=1)

    def per_example_grad(self, logits: Array, labels: Array) -> Array:
        self._check(logits, labels)
        probabilities, _ = activations.softmax(logits)
        # The one-hot is subtracted as a scatter of -1 at (b, y_b), so no dense one-hot is built. The label
        # indexing then stays an operation of its own in the compiled step, which lets XLA's CPU runtime start
        # the step on its worker threads (BENCHMARKS.md, "The W1 float32 gap").
        rows = jnp.indices(labels.shape, sparse=True)
        kept = self._kept(labels)
        gradient = probabilities.at[(*rows, jnp.where(kept, labels, 0).astype(jnp.int32))].add(-1)
        gradient = jnp.where(in_range(labels, logits.shape[-1], self.ignore_index)[..., None], gradient, jnp.nan)
        return gradient * self._weights(labels, gradient.dtype)[..., None]

    def hessian_sqrt(self, logits: Array, labels: Array) -> Array:
        """``H_b = diag(p) - p p^T`` (independent of the label), factored as ``S S^T`` with column
        ``c = sqrt(p_c) (e_c - p)``: ``sum_c p_c (e_c - p)(e_c - p)^T = diag(p) - 2 p p^T + p p^T``, as
        ``sum_c p_c = 1``. With positions, ``H_b`` is block-diagonal (one such block per position, divided by
        the number of positions ``P``): a column per (position, class), zero at every other position."""
        self._check(logits, labels)
        p, _ = activations.softmax(logits)
        classes, positions = logits.shape[-1], self._positions(logits)
        per_position = jnp.sqrt(p)[..., :, None] * (jnp.eye(classes, dtype=p.dtype) - p[..., None, :])  # [.., c, c']
        per_position = per_position * jnp.sqrt(self._weights(labels, p.dtype))[..., None, None]
        if logits.ndim == 2:
            return per_position.transpose(1, 0, 2)
        batch, grid = logits.shape[0], logits.shape[1:-1]
        per_position = per_position.reshape(batch, positions, classes, classes)
        at = jnp.eye(positions, dtype=p.dtype)  # [position of the column, position of the entry]
        columns = jnp.einsum("qr,bqcd->qcbrd", at, per_position)
        return columns.reshape((positions * classes, batch, *grid, classes))

    def hessian_vector(self, logits: Array, labels: Array, v: Array) -> Array:
        """``H_b v = p * (v - <p, v>)`` at every position (the softmax's Jacobian, symmetric), times ``w_bt``."""
        self._check(logits, labels)
        p, _ = activations.softmax(logits)
        weights = self._weights(labels, p.dtype)[..., None]
        return activations.softmax_backward(p, v) * weights / logits.shape[0]

    def sampled_hessian_sqrt(self, logits: Array, labels: Array, key: Array, samples: int) -> Array:
        """``p - e_y`` with ``y`` drawn from ``softmax(z)`` at every position independently: the gradient at
        sampled labels, whose outer product has mean ``diag(p) - p p^T`` per position and zero across them."""
        self._check(logits, labels)
        p, _ = activations.softmax(logits)
        drawn = jax.random.categorical(key, logits, axis=-1, shape=(samples, *logits.shape[:-1]))
        scale = jnp.sqrt(self._weights(labels, p.dtype) / samples)[None, ..., None]
        return (p[None] - jax.nn.one_hot(drawn, logits.shape[-1], dtype=p.dtype)) * scale


def _unit_columns(outputs: Array, scale: Array) -> Array:
    """``(units, batch, *output)``: column ``c`` is ``scale`` at output entry ``c`` and zero elsewhere, for a
    Hessian that is diagonal in the output entries."""
    units = _units(outputs)
    basis = jnp.eye(units, dtype=scale.dtype).reshape((units, 1) + outputs.shape[1:])
    return basis * scale[None]


@dataclass(frozen=True, repr=False)
class SigmoidBinaryCrossEntropy(Loss):
    """Sigmoid fused with binary cross-entropy, on logits ``z`` and targets ``t`` in [0, 1] of the same shape.

    Elementwise ``-t log s(z) - (1 - t) log(1 - s(z)) = softplus(z) - t z``, averaged over the output units
    per example. Since ``softplus' = sigmoid``, ``d l_b / d z_b = (sigmoid(z_b) - t_b) / units``.
    """

    name = "sigmoid_binary_cross_entropy"
    kind = "classification"

    def accuracy(self, logits: Array, targets: Array) -> Array:
        return jnp.mean((logits > 0) == (targets > 0.5))

    def random_targets(self, logits: Any, key: Array) -> Array:
        return jax.random.uniform(key, logits.shape, logits.dtype)

    def predictive(self, logits: Array) -> Array:
        return jax.nn.sigmoid(logits)

    def negative_log_likelihood_affine(self, units: int, sigma_noise: float) -> tuple[float, float]:
        """Bernoulli per unit: the loss averages over the units, the log-likelihood sums."""
        return float(units), 0.0

    def predictive_negative_log_likelihood(self, probabilities: Array, targets: Array) -> Array:
        tiny = jnp.finfo(probabilities.dtype).tiny
        t = jnp.asarray(targets, probabilities.dtype)
        each = t * jnp.log(jnp.maximum(probabilities, tiny)) + (1 - t) * jnp.log(jnp.maximum(1 - probabilities, tiny))
        return -jnp.mean(jnp.sum(each.reshape(each.shape[0], -1), axis=1))

    def per_example(self, logits: Array, targets: Array) -> Array:
        self._check_same_shape(logits, targets)
        elementwise = activations.softplus(logits)[0] - targets * logits
        return jnp.mean(elementwise.reshape(logits.shape[0], -1), axis=1)

    def per_example_grad(self, logits: Array, targets: Array) -> Array:
        self._check_same_shape(logits, targets)
        return (jax.nn.sigmoid(logits) - targets) / _units(logits)

    def hessian_sqrt(self, logits: Array, targets: Array) -> Array:
        """``H_b = diag(s (1 - s)) / units`` with ``s = sigmoid(z_b)``: column ``c`` is
        ``sqrt(s_c (1 - s_c) / units) e_c``."""
        self._check_same_shape(logits, targets)
        s = jax.nn.sigmoid(logits)
        return _unit_columns(logits, jnp.sqrt(s * (1 - s) / _units(logits)))

    def hessian_vector(self, logits: Array, targets: Array, v: Array) -> Array:
        """``H_b = diag(s (1 - s)) / units``."""
        self._check_same_shape(logits, targets)
        s = jax.nn.sigmoid(logits)
        return s * (1 - s) * v / (_units(logits) * logits.shape[0])

    def sampled_hessian_sqrt(self, logits: Array, targets: Array, key: Array, samples: int) -> Array:
        """``(s - y) / sqrt(units)`` with ``y ~ Bernoulli(s)`` entry by entry: independent entries of variance
        ``s (1 - s)``, so the outer product has mean ``diag(s (1 - s)) / units``."""
        self._check_same_shape(logits, targets)
        s = jax.nn.sigmoid(logits)
        drawn = jax.random.bernoulli(key, s, (samples, *logits.shape)).astype(s.dtype)
        return (s[None] - drawn) / math.sqrt(_units(logits) * samples)


mse = MeanSquaredError()
softmax_cross_entropy = SoftmaxCrossEntropy()
sigmoid_binary_cross_entropy = SigmoidBinaryCrossEntropy()

BY_NAME: dict[str, Loss] = {loss.name: loss for loss in (mse, softmax_cross_entropy, sigmoid_binary_cross_entropy)}
BY_NAME.update({"cross_entropy": softmax_cross_entropy, "bce": sigmoid_binary_cross_entropy})


def get(name: str | Loss) -> Loss:
    """Resolve a loss by name (``mse``, ``softmax_cross_entropy``/``cross_entropy``,
    ``sigmoid_binary_cross_entropy``/``bce``) or return a loss object unchanged."""
    if isinstance(name, Loss):
        return name
    try:
        return BY_NAME[name]
    except KeyError:
        raise SettingError(f"unknown loss {name!r}; known: {', '.join(sorted(BY_NAME))}") from None
