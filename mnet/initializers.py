"""Weight initializers: ``init(key, shape, dtype) -> array`` for a weight of shape ``(fan_in, fan_out)``.

Variances follow the usual derivations for keeping activations at unit scale:

============================  =========================================
name                          distribution
============================  =========================================
``glorot_uniform`` (xavier)   U(-a, a), a = sqrt(6 / (fan_in + fan_out))
``glorot_normal``             N(0, 2 / (fan_in + fan_out))
``he_uniform`` (kaiming)      U(-a, a), a = sqrt(6 / fan_in)
``he_normal``                 N(0, 2 / fan_in)
``lecun_uniform``             U(-a, a), a = sqrt(3 / fan_in)
``lecun_normal``              N(0, 1 / fan_in)
``normal``                    N(0, 0.01^2); ``normal(stddev)`` for another scale
``zeros``                     0
============================  =========================================

For a weight with more than two axes (a convolution kernel ``(kh, kw, c_in, c_out)``) the receptive field
multiplies both fans, as in every major framework.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from mnet.errors import SettingError

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) < 2:
        return (shape[0] if shape else 1,) * 2
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


@dataclass(frozen=True)
class VarianceScaling:
    """Zero-mean initializer with variance ``scale / fan`` (hashable, so layers holding it stay hashable).

    Arguments:
        scale: numerator of the variance.
        fan: ``"in"``, ``"out"`` or ``"avg"`` (the mean of both fans).
        distribution: ``"normal"`` or ``"uniform"``.
    """

    scale: float
    fan: str
    distribution: str

    def __call__(self, key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        fan_in, fan_out = _fans(shape)
        fan = {"in": fan_in, "out": fan_out, "avg": (fan_in + fan_out) / 2}[self.fan]
        variance = self.scale / max(fan, 1)
        if self.distribution == "uniform":
            limit = math.sqrt(3.0 * variance)
            return jax.random.uniform(key, shape, dtype, -limit, limit)
        return math.sqrt(variance) * jax.random.normal(key, shape, dtype)


@dataclass(frozen=True)
class Normal:
    """N(0, stddev^2), independent of the fans."""

    stddev: float = 0.01

    def __call__(self, key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return self.stddev * jax.random.normal(key, shape, dtype)


def zeros(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """All zeros (the default for biases)."""
    del key
    return jnp.zeros(shape, dtype)


def ones(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """All ones (the default for normalisation scales)."""
    del key
    return jnp.ones(shape, dtype)


glorot_uniform = VarianceScaling(1.0, "avg", "uniform")
glorot_normal = VarianceScaling(1.0, "avg", "normal")
he_uniform = VarianceScaling(2.0, "in", "uniform")
he_normal = VarianceScaling(2.0, "in", "normal")
lecun_uniform = VarianceScaling(1.0, "in", "uniform")
lecun_normal = VarianceScaling(1.0, "in", "normal")
normal = Normal()

BY_NAME: dict[str, Initializer] = {
    "glorot_uniform": glorot_uniform,
    "glorot_normal": glorot_normal,
    "xavier_uniform": glorot_uniform,
    "xavier_normal": glorot_normal,
    "he_uniform": he_uniform,
    "he_normal": he_normal,
    "kaiming_uniform": he_uniform,
    "kaiming_normal": he_normal,
    "lecun_uniform": lecun_uniform,
    "lecun_normal": lecun_normal,
    "normal": normal,
    "zeros": zeros,
    "ones": ones,
}


def get(initializer: str | Initializer) -> Initializer:
    """Resolve an initializer given by name (see the table above) or return a callable unchanged.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if callable(initializer):
        return initializer
    try:
        return BY_NAME[initializer]
    except KeyError:
        raise SettingError(f"unknown initializer {initializer!r}; known: {', '.join(sorted(BY_NAME))}") from None
