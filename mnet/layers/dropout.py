"""Inverted dropout, with explicit randomness."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from mnet.core.curvature import Curvature
from mnet.core.layer import Layer
from mnet.core.protocol import Array, Cache, Params, Shape
from mnet.errors import SettingError


@dataclass(frozen=True, repr=False)
class Dropout(Layer):
    """Inverted dropout: while training, each entry is zeroed with probability ``rate`` and the survivors are
    scaled by ``1 / (1 - rate)`` so that the expected output equals the input; at evaluation it is the identity.

    ``rate`` is the probability of DROPPING an entry (as PyTorch's ``p`` and Keras's ``rate``), not of keeping
    it: ``Dropout(0.1)`` keeps 90%. (Some libraries' ``keep_prob`` or a reversed ``rate`` have confused this.)

    Forward ``y = x * m`` with ``m = bernoulli(1 - rate) / (1 - rate)``; backward ``dx = dy * m``: the same
    mask, which is the cache (the scalar 1 when not training).

    Randomness is explicit: ``forward(params, x, key=key, train=True)``; training without a key is an error.
    """

    rate: float = 0.5

    @property
    def stochastic(self) -> bool:
        return True

    def __post_init__(self):
        if not 0 <= self.rate < 1:
            raise SettingError(f"Dropout: rate is the probability of dropping and must be in [0, 1), got {self.rate!r}")

    def __repr__(self) -> str:
        return f"Dropout({self.rate})"

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        return self._check_input_shape(input_shape), ()

    def forward(
        self, params: Params, x: Array, *, key: Array | None = None, train: bool = False
    ) -> tuple[Array, Cache]:
        self._check_input(x, min_rank=1)
        self._check_no_params(params)
        if not train or self.rate == 0:
            return x, jnp.ones((), x.dtype)
        if key is None:
            raise self._fail("training (train=True) needs an explicit key=jax.random.key(...)")
        # Drawn in float32 whatever the precision (bernoulli would follow the default float dtype), so that one key
        # gives one mask in float32 and float64 alike: a float64 finite-difference check then sees the same network.
        keep = jax.random.uniform(key, x.shape, jnp.float32) < 1 - self.rate
        mask = keep.astype(x.dtype) / (1 - self.rate)
        return x * mask, mask

    curvature_free = True  # a fixed mask: linear in the input

    def backward(self, params: Params, mask: Cache, dy: Array) -> tuple[Params, Array]:
        return (), dy * mask

    def tangent(self, params: Params, mask: Cache, dparams: Params, dx: Array) -> Array:
        """``dy = dx * mask``: the same mask as the forward pass drew."""
        return dx * mask

    def diag_hessian(self, params: Params, mask: Cache, curvature: Curvature) -> tuple[Params, Curvature]:
        """Linear with a diagonal Jacobian ``diag(mask)``: columns times the mask, the diagonal times its square."""
        return (), curvature.through(lambda v: v * mask, diagonal=lambda d: d * mask * mask)
