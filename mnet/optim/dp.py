"""Differentially private SGD by hand: each example's gradient clipped to a norm (from the per-example squared norms,
without materialising the per-example gradients where the layers allow), summed, and Gaussian noise added as an
optax transformation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mnet.core.protocol import Array, LayerProtocol, Params, call_forward
from mnet.errors import SettingError
from mnet.losses import Loss, with_mask
from mnet.quantities.per_example import sq_norms


def clipped_value_and_grad(
    net: LayerProtocol, loss: Loss, clip_norm: float
) -> Callable[[Params, Array, Array], tuple[Array, Params]]:
    """DP-SGD's clipped gradient: ``f(params, x, targets) -> (loss value, mean_b g_b * min(1, C / ||g_b||))``.

    Computed without per-example gradients: one forward pass, the per-example norms from the cotangents, then
    a second backward pass whose cotangent rows are reweighted by ``min(1, C / ||g_b||) / batch``. Backward is
    linear in the cotangent, so that pass returns exactly the sum of the clipped per-example gradients.
    Same signature as :func:`mnet.value_and_grad`, so ``mnet.fit(..., grad=clipped_value_and_grad(...))`` trains
    with it; add noise with :func:`dp_noise`.

    Arguments:
        clip_norm: ``C``, the largest L2 norm an example's gradient may keep.

    Returns:
        ``f(params, x, targets, *, mask=None, included=None, expected_batch=None)``. ``included`` (``(batch,)``, 1
        for the examples drawn, 0 for padding) and ``expected_batch`` are what ``fit(sampling="poisson")`` passes:
        the sum of the included clipped gradients is divided by ``expected_batch``.
    """
    if not (isinstance(clip_norm, int | float) and 0 < clip_norm < float("inf")):
        raise SettingError(f"clipped_value_and_grad: clip_norm must be a positive number, got {clip_norm!r}")

    def clipped_fn(
        params: Params,
        x: Array,
        targets: Array,
        *,
        mask: Array | None = None,
        included: Array | None = None,
        expected_batch: int | None = None,
    ) -> tuple[Array, Params]:
        masked_loss, targets = with_mask(loss, targets, mask)
        outputs, cache = call_forward(net, params, x, mask=mask)
        cotangents = masked_loss.per_example_grad(outputs, targets)
        norms = jnp.sqrt(sq_norms(net, masked_loss, params, cache, x, targets, outputs, mask))
        factors = jnp.minimum(1, clip_norm / jnp.maximum(norms, jnp.finfo(norms.dtype).tiny))
        value = masked_loss.value(outputs, targets)
        if included is not None:
            # Poisson sampling: the rows past the step's draw are padding, and the clipped sum is divided by the
            # expected batch, not by the rows drawn (the noise is calibrated to that divisor).
            factors = factors * included
            losses_of = masked_loss.per_example(outputs, targets)
            value = jnp.sum(losses_of * included) / jnp.maximum(jnp.sum(included), 1)
        factors = factors / (expected_batch or x.shape[0])
        weighted = cotangents * factors.reshape((-1,) + (1,) * (cotangents.ndim - 1)).astype(cotangents.dtype)
        grads, _ = net.backward(params, cache, weighted)
        return value, grads

    return clipped_fn


class DPNoiseState(NamedTuple):
    key: jax.Array


def dp_noise(
    clip_norm: float, noise_multiplier: float, batch_size: int | None, key: jax.Array
) -> optax.GradientTransformationExtraArgs:
    """An optax transformation adding DP-SGD's Gaussian noise to a mean of clipped gradients:
    ``N(0, (noise_multiplier * clip_norm / batch_size)^2)`` per coordinate, a fresh key every step.

    Chain it before the optimizer: ``optax.chain(mnet.dp_noise(C, sigma, None, key), optax.sgd(lr))`` with gradients
    from :func:`clipped_value_and_grad`, and train with :func:`mnet.fit`. The noise is only calibrated if
    ``batch_size`` is the batch the mean was taken over, so :func:`mnet.fit` hands each step's batch to the
    transformation (it is an ``optax.GradientTransformationExtraArgs``): with ``batch_size=None`` the noise follows
    that batch, and a ``batch_size`` that differs from it is refused when the step is traced. Under Poisson sampling
    (``fit(sampling="poisson")``) the batch is the expected one, the divisor of the clipped sum. The privacy spent is
    :func:`mnet.dp_epsilon`'s.

    Arguments:
        clip_norm: ``C``, as given to :func:`clipped_value_and_grad` (> 0).
        noise_multiplier: ``sigma`` (>= 0): the noise's standard deviation in units of ``C``.
        batch_size: the batch the clipped gradients are averaged over, or None to take it from the step's batch.
        key: seeds the noise.

    Returns:
        The transformation; ``update(updates, state, params=None, *, inputs=None, batch_size=None)``.
    """
    if not (isinstance(clip_norm, int | float) and 0 < clip_norm < float("inf")):
        raise SettingError(f"dp_noise: clip_norm must be a positive number, got {clip_norm!r}")
    if not (isinstance(noise_multiplier, int | float) and 0 <= noise_multiplier < float("inf")):
        raise SettingError(f"dp_noise: noise_multiplier must be a number >= 0, got {noise_multiplier!r}")
    if batch_size is not None and not (isinstance(batch_size, int) and batch_size > 0):
        raise SettingError(f"dp_noise: batch_size must be a positive int (or None: fit's batch), got {batch_size!r}")

    def init(params):
        del params
        return DPNoiseState(key)

    def update(updates, state, params=None, **extra):
        del params
        size = _noise_batch(batch_size, extra)
        scale = noise_multiplier * clip_norm / size
        key, subkey = jax.random.split(state.key)
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        keys = jax.random.split(subkey, max(len(leaves), 1))
        noisy = [leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
        return jax.tree_util.tree_unflatten(treedef, noisy), DPNoiseState(key)

    return optax.GradientTransformationExtraArgs(init, update)


def _noise_batch(batch_size: int | None, extra: dict) -> int:
    """The batch the noise is calibrated to: the step's (``expected_batch`` under Poisson sampling, else the rows of
    ``inputs``), which must equal ``batch_size`` when both are known."""
    seen = extra.get("expected_batch")
    if seen is None and extra.get("inputs") is not None:
        seen = int(jnp.shape(extra["inputs"])[0])
    if seen is None and batch_size is None:
        raise SettingError(
            "dp_noise(batch_size=None) takes the batch from the training step, and none was given: pass batch_size, "
            "or update(..., inputs=x) as mnet.fit does"
        )
    if seen is not None and batch_size is not None and seen != batch_size:
        raise SettingError(
            f"dp_noise: calibrated for batches of {batch_size}, but the step averages over {seen} examples (the noise "
            "would be miscalibrated); pass batch_size=None to follow fit's batch"
        )
    chosen = seen if seen is not None else batch_size
    assert chosen is not None  # one of the two, by the checks above
    return int(chosen)
