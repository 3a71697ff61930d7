"""A dataset cut into chunks: the slices a Python loop runs over (one compiled call per chunk, a progress bar
between them), and equal chunks stacked for ``lax.map`` (one compiled call for the whole dataset, memory of one
chunk), with the rows that do not fill a chunk kept apart so that every example counts once."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from mnet.core.protocol import Array


def chunks(n: int, batch_size: int) -> list[slice]:
    """The slices of ``n`` rows in chunks of ``batch_size`` (the last one shorter)."""
    return [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def split_batches(
    arrays: tuple[Any, ...], batch_size: int | None
) -> tuple[tuple[Array, ...], tuple[Array, ...] | None]:
    """``arrays`` (of one leading size ``n``) as full chunks ``(n // size, size, ...)`` and the rest (None when
    there is none), ``size = min(batch_size, n)`` (all of ``n`` for None)."""
    n = jnp.shape(arrays[0])[0]
    size = n if batch_size is None else min(batch_size, n)
    full = (n // size) * size
    chunked = tuple(jnp.asarray(a)[:full].reshape((n // size, size) + jnp.shape(a)[1:]) for a in arrays)
    rest = None if full == n else tuple(jnp.asarray(a)[full:] for a in arrays)
    return chunked, rest
