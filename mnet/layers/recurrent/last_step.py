"""``LastStep``: a sequence's last time step, for classifying it by a recurrence's final state."""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from mnet.core.layer import Layer, shape_record
from mnet.core.protocol import Array, Cache, Params, Shape


@dataclass(frozen=True, repr=False)
class LastStep(Layer):
    """``(batch, T, d) -> (batch, d)``: the last time step, for classifying a sequence by a recurrence's final
    state. Backward places ``dy`` at the last step and zeros elsewhere."""

    curvature_free = True

    def __repr__(self) -> str:
        return "LastStep()"

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        shape = self._check_input_shape(input_shape, min_rank=2)
        return shape[1:], ()

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        self._check_no_params(params)
        self._check_input(x, min_rank=3)
        return x[:, -1], shape_record(x)

    def backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        dx = jnp.zeros(dy.shape[:1] + cache.shape[1:], dy.dtype)
        return (), dx.at[:, -1].set(dy)

    def tangent(self, params: Params, cache: Cache, dparams: Params, dx: Array | None) -> Array | None:
        return None if dx is None else dx[:, -1]
