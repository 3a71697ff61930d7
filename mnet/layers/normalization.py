"""Normalisation layers: each example over its features (LayerNorm, and RMSNorm without the centring), or each
feature over the batch (BatchNorm).

Both normalise ``x`` over some axes, then scale and shift: ``y = gamma * xhat + beta`` with ::

    mu = mean(x),  var = mean((x - mu)^2),  r = 1 / sqrt(var + eps),  xhat = (x - mu) r

(the means over the normalised axes: the last axis for LayerNorm; every axis but the last, the batch included, for
BatchNorm in training). With ``g = dy * gamma`` the normalisation's Jacobian-vector product has the closed form ::

    dx = N g = r * (g - mean(g) - xhat * mean(g * xhat))

(the two means remove the components along the directions that normalisation itself removed: the constant vector
and ``xhat``), and ``dgamma = sum(dy * xhat)``, ``dbeta = sum(dy)`` over every axis but the last. ``N`` is symmetric,
so forward mode applies the same map. :class:`_Normalization` holds these rules once; the two layers differ only in
the axes of the means (and BatchNorm's evaluation mode, an affine map).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp

from mnet.core.curvature import Curvature, position_columns, signed_square_sum
from mnet.core.layer import Layer, describe
from mnet.core.protocol import Array, Cache, Params, Shape, default_float_dtype
from mnet.errors import SettingError


class _Normalization(Layer):
    """The rules shared by LayerNorm and BatchNorm in training: ``_axes(ndim)`` names the normalised axes."""

    eps: float
    #: Whether the mean is subtracted (LayerNorm, BatchNorm) or not (RMSNorm).
    centred = True

    @property
    def shifted(self) -> bool:
        """Whether there is a shift ``beta``: with the centring (LayerNorm, BatchNorm), or asked for (RMSNorm)."""
        return self.centred

    def __post_init__(self):
        if not (isinstance(self.eps, int | float) and 0 < self.eps < float("inf")):
            raise SettingError(
                f"{type(self).__name__}: eps must be a positive number (it keeps 1/sqrt finite), got {self.eps!r}"
            )

    def _axes(self, ndim: int) -> tuple[int, ...]:
        raise NotImplementedError

    def _mean(self, v: Array) -> Array:
        return jnp.mean(v, axis=self._axes(v.ndim), keepdims=True)

    def _normalized(self, xhat: Array, rstd: Array, v: Array) -> Array:
        """``N v = rstd (v - mean(v) - xhat mean(v xhat))``: the symmetric Jacobian of ``xhat`` applied to ``v``."""
        projected = v - xhat * self._mean(v * xhat)
        return rstd * (projected - self._mean(v) if self.centred else projected)

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        shape = self._check_input_shape(input_shape)
        dtype = default_float_dtype() if dtype is None else dtype
        params = {"gamma": jnp.ones(shape[-1:], dtype)}
        return shape, params | {"beta": jnp.zeros(shape[-1:], dtype)} if self.shifted else params

    def _check(self, params: Params, x: Array) -> None:
        self._check_input(x)
        keys = {"gamma", "beta"} if self.shifted else {"gamma"}
        if not isinstance(params, dict) or set(params) != keys:
            raise self._fail(f"expects params with keys {sorted(keys)}, got {describe(params)}")
        if params["gamma"].shape != x.shape[-1:]:
            raise self._fail(f"expects input width {params['gamma'].shape[0]}, got input of shape {tuple(x.shape)}")

    def _statistics(self, x: Array) -> tuple[Array, Array, Array, Array]:
        """``(xhat, rstd, mu, var)`` over the normalised axes (kept as size-1 axes)."""
        mean = self._mean(x) if self.centred else jnp.zeros((), x.dtype)
        centred = x - mean
        var = self._mean(centred * centred)  # RMSNorm: the mean square
        rstd = jax.lax.rsqrt(var + self.eps)
        return centred * rstd, rstd, mean, var

    @staticmethod
    def _feature_sums(v: Array) -> Array:
        return jnp.sum(v.reshape(-1, v.shape[-1]), axis=0)

    def _affine_grads(self, xhat: Array, dy: Array) -> Params:
        grads = {"gamma": self._feature_sums(dy * xhat)}
        return grads | {"beta": self._feature_sums(dy)} if self.shifted else grads

    def _train_backward(self, params: Params, xhat: Array, rstd: Array, dy: Array) -> tuple[Params, Array]:
        return self._affine_grads(xhat, dy), self._normalized(xhat, rstd, dy * params["gamma"])

    def _train_tangent(self, params: Params, xhat: Array, rstd: Array, dparams: Params, dx: Array | None) -> Array:
        """``dy = gamma * N dx + xhat * dgamma + dbeta``: ``N`` is symmetric, so forward mode applies backward's map."""
        dy = xhat * dparams["gamma"] + dparams["beta"] if self.shifted else xhat * dparams["gamma"]
        return dy if dx is None else dy + params["gamma"] * self._normalized(xhat, rstd, dx)

    def _train_backward_tangent(
        self, params: Params, xhat: Array, rstd: Array, tangents: tuple, dy: Array, dy_tangent: Array
    ) -> tuple[Params, Array, Array]:
        """The backward pass differentiated along the tangent (Hessian-vector products). With ``R{x} = x_t``,
        ``R{xhat} = N x_t``, ``R{rstd} = -rstd^2 mean(xhat x_t)`` and ``g = gamma * dy``::

            R{dgamma} = sum(R{dy} xhat + dy R{xhat})        R{dbeta} = sum(R{dy})
            R{dx} = N (gamma R{dy} + R{gamma} dy) - rstd mean(xhat x_t) N g
                    - rstd (R{xhat} mean(g xhat) + xhat mean(g R{xhat}))
        """
        dparams, x_tangent = tangents
        g = dy * params["gamma"]
        dx = self._normalized(xhat, rstd, g)
        hv, dx_tangent = self._train_backward(params, xhat, rstd, dy_tangent)
        dx_tangent = dx_tangent + self._normalized(xhat, rstd, dy * dparams["gamma"])
        if x_tangent is not None:
            xhat_tangent = self._normalized(xhat, rstd, x_tangent)
            hv["gamma"] = hv["gamma"] + self._feature_sums(dy * xhat_tangent)
            dx_tangent = dx_tangent - rstd * (
                self._mean(xhat * x_tangent) * dx
                + xhat_tangent * self._mean(g * xhat)
                + xhat * self._mean(g * xhat_tangent)
            )
        return hv, dx, dx_tangent

    def _per_example_affine_grads(self, xhat: Array, dy: Array) -> Params:
        """Example ``b``'s own ``dgamma_b = sum(dy_b * xhat_b)``, ``dbeta_b = sum(dy_b)`` over its positions."""
        batch, n = dy.shape[0], xhat.shape[-1]
        grads = {"gamma": jnp.sum((dy * xhat).reshape(batch, -1, n), axis=1)}
        return grads | {"beta": jnp.sum(dy.reshape(batch, -1, n), axis=1)} if self.shifted else grads


@dataclass(frozen=True, repr=False)
class LayerNorm(_Normalization):
    """Normalise each example over its last axis, then scale and shift: ``y = gamma * xhat + beta`` (the rules are
    in :mod:`mnet.layers.normalization`'s docstring). Cache: ``xhat`` and ``r``.

    Arguments:
        eps: added to the variance (default 1e-5, as PyTorch).
    """

    eps: float = 1e-5

    def __repr__(self) -> str:
        return "LayerNorm()" if self.eps == 1e-5 else f"LayerNorm(eps={self.eps})"

    def _axes(self, ndim: int) -> tuple[int, ...]:
        return (ndim - 1,)

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        self._check(params, x)
        xhat, rstd, _, _ = self._statistics(x)
        y = params["gamma"] * xhat
        return (y + params["beta"] if self.shifted else y), (xhat, rstd)

    def backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        xhat, rstd = cache
        return self._train_backward(params, xhat, rstd, dy)

    def tangent(self, params: Params, cache: Cache, dparams: Params, dx: Array | None) -> Array:
        xhat, rstd = cache
        return self._train_tangent(params, xhat, rstd, dparams, dx)

    def backward_tangent(
        self, params: Params, cache: Cache, tangents: tuple, dy: Array, dy_tangent: Array
    ) -> tuple[Params, Array, Array]:
        xhat, rstd = cache
        return self._train_backward_tangent(params, xhat, rstd, tangents, dy, dy_tangent)

    def per_example_backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        xhat, rstd = cache
        return self._per_example_affine_grads(xhat, dy), self._normalized(xhat, rstd, dy * params["gamma"])

    def diag_hessian(self, params: Params, cache: Cache, curvature: Curvature) -> tuple[Params, Curvature]:
        """The Hessian diagonal (:mod:`mnet.core.curvature`). ``y`` is linear in ``gamma`` and ``beta``, so their
        shares read the Hessian at ``y`` as a dense layer with one weight per feature does: per column
        ``(sum_s xhat_sj c_sj)^2``, and ``sum_s xhat_sj^2 d_sj`` from the diagonal part. The input gets
        ``J^T H_y J`` (through :meth:`backward`) plus the layer's own curvature, at each position the Hessian of
        ``u . xhat(x)`` with ``u = g * gamma`` (``g`` the gradient reaching ``y``). With ``c = r^2 / d``,
        ``w = u`` (RMSNorm) or ``u - mean(u)`` (LayerNorm) and ``k = w . xhat``, differentiating
        ``r = (|x|^2/d + eps)^(-1/2)`` twice (``dr = -r^3 x / d``) gives ::

            H_own = -c (w xhat^T + xhat w^T) + (3 c k / d) xhat xhat^T - c k I      (RMSNorm)
            H_own = P (RMSNorm's, at the centred input) P = ... - c k I + (c k / d) 1 1^T   (LayerNorm, P = I - 1 1^T/d)

        ``-c k I`` joins the diagonal; the rank-one terms become signed columns (the first as the difference of
        the squares of ``w +- xhat``), one set per position, each nonzero at its position only. Cost: three (four)
        columns per position, each the size of one example, so ``O(T^2 d)`` per example for ``T`` positions."""
        xhat, rstd = cache
        gamma = params["gamma"]
        batch, width = xhat.shape[0], xhat.shape[-1]
        xh = xhat.reshape(batch, -1, width)

        def squares(columns: Array) -> Params:
            cs = columns.reshape((columns.shape[0],) + xh.shape)
            per = {"gamma": jnp.einsum("bpj,kbpj->kbj", xh, cs) ** 2}
            return per | {"beta": jnp.sum(cs, axis=2) ** 2} if self.shifted else per

        share = jax.tree_util.tree_map(lambda v: jnp.sum(v, axis=0), signed_square_sum(curvature.columns(), squares))
        if curvature.diag is not None:
            d = curvature.diag.reshape(xh.shape)
            share["gamma"] = share["gamma"] + jnp.einsum("bpj,bpj->j", xh**2, d)
            if self.shifted:
                share["beta"] = share["beta"] + jnp.sum(d, axis=(0, 1))
        below = curvature.through(lambda v: self._normalized(xhat, rstd, v * gamma))
        u = curvature.grad * gamma
        w = u - jnp.mean(u, axis=-1, keepdims=True) if self.centred else u
        k = jnp.sum(w * xhat, axis=-1, keepdims=True)
        c = rstd**2 / width
        terms: list[tuple[Array, Array | float, Array | float]] = [
            (w + xhat, c / 2, -1.0),
            (w - xhat, c / 2, 1.0),
            (xhat, 3 * c * jnp.abs(k) / width, jnp.sign(k)),
        ]
        if self.centred:
            terms.append((jnp.ones_like(xhat), c * jnp.abs(k) / width, jnp.sign(k)))
        below = below.plus_diagonal(jnp.broadcast_to(-c * k, xhat.shape))
        return share, replace(below, groups=below.groups + (position_columns(terms),))


@dataclass(frozen=True, repr=False)
class RMSNorm(LayerNorm):
    """Root-mean-square normalisation (Zhang and Sennrich, 2019) over the last axis, as ``torch.nn.RMSNorm(d,
    eps=eps)`` with ``weight = gamma``: ``y = gamma * xhat``, ``xhat = x r``, ``r = 1 / sqrt(mean(x^2) + eps)``.
    No mean is subtracted, and there is no shift unless ``use_bias`` (Equinox's ``RMSNorm`` has one by default):
    then ``y = gamma * xhat + beta``. Params ``{"gamma": (d,)}`` (and ``"beta"``); cache ``xhat`` and ``r``.

    The rules are LayerNorm's without the centring. With ``g = dy * gamma`` the Jacobian-vector product is ::

        dx = N g = r * (g - xhat * mean(g * xhat))

    (from ``d r = -r^3 mean(x dx) = -r^2 mean(xhat dx)``: ``d xhat = r dx - xhat mean(xhat dx) r``), symmetric, so
    forward mode applies it too; ``dgamma = sum(dy * xhat)`` over every axis but the last. The Hessian-vector rule
    is LayerNorm's (:meth:`_Normalization._train_backward_tangent`) with this ``N``: ``R{r} = -r^2 mean(xhat x_t)``
    holds for both.

    Arguments:
        eps: added to the mean square (default 1e-6, as LLaMA's).
        use_bias: a shift ``beta`` after the scale (default False, as LLaMA's and PyTorch's).
    """

    eps: float = 1e-6
    use_bias: bool = False
    centred = False

    @property
    def shifted(self) -> bool:
        return self.use_bias

    def __repr__(self) -> str:
        options = [f"eps={self.eps}"] if self.eps != 1e-6 else []
        options += ["use_bias=True"] if self.use_bias else []
        return f"RMSNorm({', '.join(options)})"


@dataclass(frozen=True, repr=False)
class BatchNorm(_Normalization):
    """Batch normalisation (Ioffe and Szegedy, 2015) of dense ``(batch, features)`` and NHWC ``(batch, H, W, C)``
    inputs: every feature (channel) normalised over the batch and every position, then scaled and shifted.

    Two modes, by what the call passes:

    * **Training** (``forward(params, x)``, or ``forward(params, x, state=s, train=True)``): the batch's own
      statistics, with the closed-form backward of the module docstring (the means over the batch couple the
      examples). The cache keeps the batch mean and (biased) variance, from which :func:`mnet.update_state` moves
      the running statistics.
    * **Evaluation** (``forward(params, x, state=s)``, ``train=False``): the running statistics of ``s``, an affine
      map ``y = gamma * (x - mean) r + beta`` with ``r = 1 / sqrt(var + eps)``: ``dx = gamma r dy`` and each
      example's output depends on it alone.

    The running statistics live in an explicit state pytree ``{"mean", "var"}`` (made by :func:`mnet.init_state`,
    zeros and ones), never in params and never changed in place. After a training step ::

        mean <- (1 - momentum) * mean + momentum * batch mean
        var  <- (1 - momentum) * var  + momentum * batch variance * n / (n - 1)     (n values per feature)

    which is PyTorch's convention (``momentum=0.1`` is the weight of the new batch, the running variance unbiased);
    Flax's ``momentum`` is the weight kept, so Flax's 0.99 is ``momentum=0.01`` here (and Flax keeps the biased
    variance).

    Per-example gradients, their norms, the NTK, the GGN diagonal and Kronecker factors need each example's output
    to depend on that example alone, which the batch statistics break: in training mode they refuse the layer
    (as Opacus does); in evaluation mode they work.

    Arguments:
        momentum: the new batch's weight in the running statistics (default 0.1, as PyTorch).
        eps: added to the variance (default 1e-5, as PyTorch).
    """

    momentum: float = 0.1
    eps: float = 1e-5
    stateful = True

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.momentum <= 1.0:
            raise SettingError(f"BatchNorm: momentum must be in [0, 1] (the new batch's weight), got {self.momentum}")

    def __repr__(self) -> str:
        extra = [f"momentum={self.momentum}"] if self.momentum != 0.1 else []
        extra += [f"eps={self.eps}"] if self.eps != 1e-5 else []
        return f"BatchNorm({', '.join(extra)})"

    def _axes(self, ndim: int) -> tuple[int, ...]:
        return tuple(range(ndim - 1))

    def initial_state(self, params: Params, cache: Cache) -> dict:
        """Running mean 0 and variance 1 per feature (PyTorch's start)."""
        return {"mean": jnp.zeros_like(params["gamma"]), "var": jnp.ones_like(params["gamma"])}

    def _check_state(self, state: Any, x: Array) -> None:
        width = x.shape[-1:]
        if not isinstance(state, dict) or set(state) != {"mean", "var"}:
            raise self._fail(
                f"expects a state {{'mean', 'var'}} of shape {width} each, got {describe(state)}; "
                "make it with mnet.init_state(net, params, input_shape)"
            )
        if any(getattr(state[name], "shape", None) != width for name in ("mean", "var")):
            raise self._fail(f"expects a state of shape {width} for input {tuple(x.shape)}, got {describe(state)}")

    def forward(self, params: Params, x: Array, *, state: Any = None, train: bool = False) -> tuple[Array, Cache]:
        self._check(params, x)
        if state is not None:
            self._check_state(state, x)
        if state is None or train:
            xhat, rstd, mean, var = self._statistics(x)
            return params["gamma"] * xhat + params["beta"], (xhat, rstd, mean.reshape(-1), var.reshape(-1))
        rstd = jax.lax.rsqrt(state["var"] + self.eps)
        xhat = (x - state["mean"]) * rstd
        return params["gamma"] * xhat + params["beta"], (xhat, rstd)

    @staticmethod
    def _training(cache: Cache) -> bool:
        """Training caches keep the batch statistics; evaluation caches only ``xhat`` and ``r``."""
        return len(cache) == 4

    def updated_state(self, state: dict, cache: Cache) -> dict:
        """The running statistics moved towards the batch's (see the class docstring); unchanged after an
        evaluation pass."""
        if not self._training(cache):
            return state
        xhat, _, mean, var = cache
        count = xhat.size // xhat.shape[-1]
        unbiased = var * (count / max(count - 1, 1))
        keep = 1 - self.momentum
        return {
            "mean": keep * state["mean"] + self.momentum * mean,
            "var": keep * state["var"] + self.momentum * unbiased,
        }

    def backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        if self._training(cache):
            return self._train_backward(params, cache[0], cache[1], dy)
        xhat, rstd = cache
        return self._affine_grads(xhat, dy), dy * params["gamma"] * rstd

    def tangent(self, params: Params, cache: Cache, dparams: Params, dx: Array | None) -> Array:
        if self._training(cache):
            return self._train_tangent(params, cache[0], cache[1], dparams, dx)
        xhat, rstd = cache
        dy = xhat * dparams["gamma"] + dparams["beta"]
        return dy if dx is None else dy + params["gamma"] * rstd * dx

    def backward_tangent(
        self, params: Params, cache: Cache, tangents: tuple, dy: Array, dy_tangent: Array
    ) -> tuple[Params, Array, Array]:
        """Training: the normalisation's rule (module docstring). Evaluation, an affine map with
        ``R{xhat} = r x_t``: ``R{dgamma} = sum(R{dy} xhat + dy R{xhat})``, ``R{dx} = r (gamma R{dy} + R{gamma} dy)``."""
        if self._training(cache):
            return self._train_backward_tangent(params, cache[0], cache[1], tangents, dy, dy_tangent)
        xhat, rstd = cache
        dparams, x_tangent = tangents
        hv, dx_tangent = self.backward(params, cache, dy_tangent)
        dx_tangent = dx_tangent + dy * dparams["gamma"] * rstd
        if x_tangent is not None:
            hv["gamma"] = hv["gamma"] + self._feature_sums(dy * x_tangent * rstd)
        return hv, dy * params["gamma"] * rstd, dx_tangent

    def _refuse_coupled(self, cache: Cache) -> None:
        if self._training(cache):
            raise self._fail(
                "normalises with the statistics of the whole batch in training mode, so each example's output "
                "depends on the other examples and has no gradient of its own: per-example gradients, their norms, "
                "the NTK, the GGN diagonal and Kronecker factors are refused (as Opacus does). Pass the running "
                "statistics, state=..., for evaluation mode, or use LayerNorm"
            )

    def per_example_backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        self._refuse_coupled(cache)
        xhat, rstd = cache
        return self._per_example_affine_grads(xhat, dy), dy * params["gamma"] * rstd

    def kronecker_factors(self, params: Params, cache: Cache, S: Array, kept: Array | None = None) -> None:
        """No Kronecker structure (like LayerNorm's ``None``), and refused in training mode."""
        self._refuse_coupled(cache)
        return None
