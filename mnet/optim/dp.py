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
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm!r}")

    def clipped_fn(params: Params, x: Array, targets: Array, *, mask: Array | None = None) -> tuple[Array, Params]:
        masked_loss, targets = with_mask(loss, targets, mask)
        outputs, cache = call_forward(net, params, x, mask=mask)
        cotangents = masked_loss.per_example_grad(outputs, targets)
        norms = jnp.sqrt(sq_norms(net, masked_loss, params, cache, x, targets, outputs, mask))
        factors = jnp.minimum(1, clip_norm / jnp.maximum(norms, jnp.finfo(norms.dtype).tiny)) / x.shape[0]
        weighted = cotangents * factors.reshape((-1,) + (1,) * (cotangents.ndim - 1)).astype(cotangents.dtype)
        grads, _ = net.backward(params, cache, weighted)
        return masked_loss.value(outputs, targets), grads

    return clipped_fn


class DPNoiseState(NamedTuple):
    key: jax.Array


def dp_noise(
    clip_norm: float, noise_multiplier: float, batch_size: int, key: jax.Array
) -> optax.GradientTransformation:
    """An optax transformation adding DP-SGD's Gaussian noise to a mean of clipped gradients:
    ``N(0, (noise_multiplier * clip_norm / batch_size)^2)`` per coordinate, a fresh key every step.

    Chain it before the optimizer: ``optax.chain(mnet.dp_noise(C, sigma, B, key), optax.sgd(lr))`` with gradients
    from :func:`clipped_value_and_grad`. (The privacy accounting for ``sigma`` is outside mnet's scope.)
    """
    scale = noise_multiplier * clip_norm / batch_size

    def init(params):
        del params
        return DPNoiseState(key)

    def update(updates, state, params=None):
        del params
        key, subkey = jax.random.split(state.key)
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        keys = jax.random.split(subkey, max(len(leaves), 1))
        noisy = [leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
        return jax.tree_util.tree_unflatten(treedef, noisy), DPNoiseState(key)

    return optax.GradientTransformation(init, update)
