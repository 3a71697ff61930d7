"""How an epoch's batches are drawn: a shuffle cut into fixed-size batches (the default), or Poisson sampling, where
every example joins each step's batch independently with probability ``batch_size / examples``, as DP-SGD's privacy
accounting assumes.

XLA needs one shape for every step, so a Poisson batch lives in a buffer of :func:`mnet.optim.accounting.
poisson_capacity` rows: the examples drawn come first, the rest is padding with weight 0 (``included``), and in the
rare step that draws more than the buffer holds a uniformly random subset is kept (truncated Poisson sampling, which
:func:`mnet.dp_epsilon` accounts for when given ``examples``).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from mnet.core.protocol import Array
from mnet.errors import SettingError

SAMPLINGS = ("shuffle", "poisson")


def poisson_batch(key: Array, examples: int, batch_size: int, capacity: int) -> tuple[Array, Array]:
    """One step's Poisson sample: ``(indices, included)``, both ``(capacity,)``; ``indices[i]`` is an example
    where ``included[i]`` is 1 and example 0 (weight 0) in the padding.

    The draw is a Bernoulli(``batch_size / examples``) per example, read in a random order, so that the first
    ``capacity`` drawn (what the buffer keeps) are a uniformly random subset of them."""
    draw_key, order_key = jax.random.split(key)
    order = jax.random.permutation(order_key, examples)
    drawn = jax.random.bernoulli(draw_key, batch_size / examples, (examples,))[order]
    (positions,) = jnp.nonzero(drawn, size=capacity, fill_value=examples)
    included = positions < examples
    indices = jnp.where(included, order[jnp.minimum(positions, examples - 1)], 0)
    return indices, included.astype(jnp.float32)


def check_sampling(sampling: str, grad, stateful: bool, on_mesh: bool) -> None:
    """Refuse a sampling ``fit`` cannot run with these settings."""
    if sampling not in SAMPLINGS:
        raise SettingError(f"fit: sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if sampling != "poisson":
        return
    if not (callable(grad) and "included" in inspect.signature(grad).parameters):
        raise SettingError(
            'fit(sampling="poisson") draws batches of varying size, so the gradient must weigh each row: '
            "grad=mnet.clipped_value_and_grad(net, loss, clip_norm)"
        )
    if stateful or on_mesh:
        raise SettingError('fit(sampling="poisson") trains a network without state on one device')
