"""Between the projections and the attention core: rotary positions on the queries and keys, and grouped-query
heads (each key-value head shared by several query heads). Both are fixed linear maps of ``[Q | K | V]``, so one
parameterless layer holds them, its backward the transposed map and its forward mode the map itself.

Rotary position embedding (Su et al. 2021, RoFormer), in the rotate-half convention of LLaMA in Hugging Face
``transformers``: a head's feature ``i < d/2`` pairs with ``i + d/2``, and at position ``t`` the pair turns by the
angle ``t * base^(-2i/d)``. With ``cos`` and ``sin`` of those angles (each repeated over the two halves) and
``half([x1, x2]) = [-x2, x1]``::

    R x = x * cos + half(x) * sin            R^T y = y * cos - half(y * sin)

(``half`` is skew: ``<half(x), z> = -<x, half(z)>``). Grouped-query attention (Ainslie et al. 2023) with ``g``
key-value heads and ``r = heads / g``: query head ``h`` reads key-value head ``h // r``, so the map copies every
key and value head ``r`` times and its transpose sums the ``r`` copies' gradients. Together::

    forward   [Q | K | V] -> [R Q | repeat(R K) | repeat(V)]
    backward  [dQ | dK | dV] -> [R^T dQ | R^T sum_copies(dK) | sum_copies(dV)]

The core then attends with ``heads`` full heads: its cache holds the copies (``r`` times the keys and values, the
memory of the ``repeat_kv`` of the reference implementation).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from mnet.core.layer import Layer, shape_record
from mnet.core.protocol import Array, Cache, Params, Shape


def rotary_angles(length: int, head_dim: int, base: float, dtype) -> tuple[Array, Array]:
    """``cos`` and ``sin`` of ``t * base^(-2i/d)`` for positions ``t < length``, each ``(length, head_dim)`` with
    the ``d/2`` frequencies repeated over the two halves."""
    precise = jnp.promote_types(dtype, jnp.float32)  # angles of bfloat16 heads in float32
    frequencies = base ** (-jnp.arange(0, head_dim, 2, dtype=precise) / head_dim)
    angles = jnp.arange(length, dtype=frequencies.dtype)[:, None] * frequencies[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def _half(x: Array) -> Array:
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-second, first], axis=-1)


@dataclass(frozen=True, repr=False)
class HeadLayout(Layer):
    """``[Q | K | V]`` with ``num_kv_heads`` key-value heads ``->`` ``[R Q | repeat(R K) | repeat(V)]`` with
    ``num_heads`` heads each (the maps are in :mod:`mnet.layers.attention.heads`' docstring). Input
    ``(batch, T, (heads + 2 kv_heads) * head_dim)``, output ``(batch, T, 3 * heads * head_dim)``; no parameters.

    Arguments:
        num_heads: query heads.
        num_kv_heads: key-value heads (dividing ``num_heads``).
        head_dim: width of every head (even when ``rope_base`` is given).
        rope_base: the rotary base (LLaMA: 10000.0), or None for no rotation.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_base: float | None = None
    curvature_free = True

    def __repr__(self) -> str:
        rope = "" if self.rope_base is None else f", rope_base={self.rope_base}"
        return f"HeadLayout({self.num_heads}, {self.num_kv_heads}, {self.head_dim}{rope})"

    @property
    def _widths(self) -> tuple[int, int]:
        return self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        shape = self._check_input_shape(input_shape)
        return shape[:-1] + (3 * self._widths[0],), ()

    def _rotate(self, x: Array, transpose: bool) -> Array:
        """``R x`` (or ``R^T x``) for ``x`` of shape ``(batch, T, heads, d)``."""
        if self.rope_base is None:
            return x
        cos, sin = rotary_angles(x.shape[1], self.head_dim, self.rope_base, x.dtype)
        cos, sin = cos[:, None, :], sin[:, None, :]
        return x * cos - _half(x * sin) if transpose else x * cos + _half(x) * sin

    def _split(self, v: Array, widths: tuple[int, int, int]) -> list[Array]:
        batch, length = v.shape[:2]
        parts = jnp.split(v, [widths[0], widths[0] + widths[1]], axis=-1)
        return [part.reshape(batch, length, -1, self.head_dim) for part in parts]

    def _apply(self, v: Array) -> Array:
        q, k, val = self._split(v, (self._widths[0], self._widths[1], self._widths[1]))
        copies = self.num_heads // self.num_kv_heads
        q, k = self._rotate(q, False), self._rotate(k, False)
        k, val = jnp.repeat(k, copies, axis=2), jnp.repeat(val, copies, axis=2)
        return jnp.concatenate([part.reshape(v.shape[:2] + (-1,)) for part in (q, k, val)], axis=-1)

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        self._check_input(x, min_rank=3)
        self._check_no_params(params)
        expected = self._widths[0] + 2 * self._widths[1]
        if x.ndim != 3 or x.shape[-1] != expected:
            raise self._fail(f"expects input of shape (batch, T, {expected}) = [Q | K | V], got {tuple(x.shape)}")
        return self._apply(x), shape_record(x)

    def backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        width = self._widths[0]
        dq, dk, dv = self._split(dy, (width, width, width))
        copies = self.num_heads // self.num_kv_heads
        batch, length = dy.shape[:2]

        def summed(d: Array) -> Array:
            return d.reshape(batch, length, self.num_kv_heads, copies, self.head_dim).sum(axis=3)

        dq, dk, dv = self._rotate(dq, True), self._rotate(summed(dk), True), summed(dv)
        return (), jnp.concatenate([part.reshape(batch, length, -1) for part in (dq, dk, dv)], axis=-1)

    def tangent(self, params: Params, cache: Cache, dparams: Params, dx: Array | None) -> Array | None:
        """The map is linear: its tangent is the map of the tangent."""
        return None if dx is None else self._apply(dx)
