"""Elementwise activations, each beside its derivative.

Every activation ``phi`` is a pair of pure functions:

* ``phi(z) -> (a, cache)``: the value ``a = phi(z)`` and the least the derivative needs
  (``relu`` keeps its mask, ``sigmoid`` and ``tanh`` keep their output, the rest keep ``z``);
* ``phi_backward(cache, da) -> dz``: the vector-Jacobian product ``dz = da * phi'(z)``. The Jacobian of
  an elementwise map is diagonal, so backprop through it is a Hadamard product, never a matrix.

The layers in :mod:`mnet.layers` wrap these pairs; the losses use :func:`sigmoid` and :func:`softplus`.
All forms are chosen to stay finite for inputs of any magnitude.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def identity(z: Array) -> tuple[Array, tuple]:
    """``a = z``."""
    return z, ()


def identity_backward(cache: tuple, da: Array) -> Array:
    """``phi' = 1``."""
    return da


def relu(z: Array) -> tuple[Array, Array]:
    """``a = max(z, 0)``; caches the mask ``z > 0``. A NaN stays NaN (as in ``jax.nn.relu``): were it mapped to 0, a
    network whose parameters had gone NaN could still return a finite loss, and no divergence check would see it."""
    return jnp.maximum(z, jnp.zeros_like(z)), z > 0


def relu_backward(mask: Array, da: Array) -> Array:
    """``phi'(z) = [z > 0]`` (0 at the kink, as ``jax.nn.relu``)."""
    return jnp.where(mask, da, jnp.zeros_like(da))


def leaky_relu(z: Array, slope: float) -> tuple[Array, Array]:
    """``a = z`` for ``z >= 0``, ``slope * z`` otherwise; caches the mask ``z >= 0``."""
    mask = z >= 0
    return jnp.where(mask, z, slope * z), mask


def leaky_relu_backward(mask: Array, da: Array, slope: float) -> Array:
    """``phi'(z) = 1`` for ``z >= 0``, ``slope`` otherwise."""
    return jnp.where(mask, da, slope * da)


def elu(z: Array, alpha: float) -> tuple[Array, Array]:
    """``a = z`` for ``z > 0``, ``alpha * (exp(z) - 1)`` otherwise; caches ``z``.

    ``expm1`` runs on ``where(z > 0, 0, z)`` so that a large positive ``z`` never overflows in the branch not
    taken. (Not ``min(z, 0)``: autodiff splits ``min``'s tie at 0 in half, and the reference would then claim
    ``phi'(0) = alpha / 2``.)
    """
    negative = alpha * jnp.expm1(jnp.where(z > 0, jnp.zeros_like(z), z))
    return jnp.where(z > 0, z, negative), z


def elu_backward(z: Array, da: Array, alpha: float) -> Array:
    """``phi'(z) = 1`` for ``z > 0``, ``alpha * exp(z)`` otherwise."""
    return da * jnp.where(z > 0, jnp.ones_like(z), alpha * jnp.exp(jnp.where(z > 0, jnp.zeros_like(z), z)))


def sigmoid(z: Array) -> tuple[Array, Array]:
    """``a = 1 / (1 + exp(-z))``; caches ``a`` because ``phi' = a (1 - a)``."""
    a = jax.nn.sigmoid(z)
    return a, a


def sigmoid_backward(a: Array, da: Array) -> Array:
    """``phi'(z) = a (1 - a)``."""
    return da * a * (1 - a)


def tanh(z: Array) -> tuple[Array, Array]:
    """``a = tanh(z)``; caches ``a`` because ``phi' = 1 - a^2``."""
    a = jnp.tanh(z)
    return a, a


def tanh_backward(a: Array, da: Array) -> Array:
    """``phi'(z) = 1 - a^2``."""
    return da * (1 - a * a)


def softplus(z: Array) -> tuple[Array, Array]:
    """``a = log(1 + exp(z)) = logaddexp(z, 0)``, finite for any ``z``; caches ``z``.

    ``logaddexp`` rather than the equivalent ``max(z, 0) + log1p(exp(-|z|))``: at exactly ``z = 0`` autodiff
    of that form takes ``d|z|/dz = 1`` and ``d max(z, 0)/dz = 1/2`` and returns 0 instead of
    ``sigmoid(0) = 1/2``, which would make the referee, not the hand rule, wrong there.
    """
    return jnp.logaddexp(z, jnp.zeros_like(z)), z


def softplus_backward(z: Array, da: Array) -> Array:
    """``phi'(z) = sigmoid(z)``."""
    return da * jax.nn.sigmoid(z)


_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


def gelu(z: Array, approximate: bool) -> tuple[Array, Array]:
    """``a = z Phi(z)`` with ``Phi`` the standard normal CDF (exact, as PyTorch's default), or with
    ``approximate=True`` the tanh form ``a = z/2 (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))``; caches ``z``."""
    if approximate:
        return 0.5 * z * (1 + jnp.tanh(_SQRT_2_OVER_PI * (z + _GELU_CUBIC * z**3))), z
    return 0.5 * z * (1 + jax.lax.erf(z / _SQRT_2)), z


def gelu_backward(z: Array, da: Array, approximate: bool) -> Array:
    """Exact: ``phi'(z) = Phi(z) + z phi(z)`` with ``phi`` the normal density.
    Tanh form: with ``t = tanh(u)``, ``u = c (z + k z^3)``:
    ``phi'(z) = (1 + t) / 2 + z (1 - t^2) c (1 + 3 k z^2) / 2``."""
    if approximate:
        t = jnp.tanh(_SQRT_2_OVER_PI * (z + _GELU_CUBIC * z**3))
        return da * (0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * z**2))
    cdf = 0.5 * (1 + jax.lax.erf(z / _SQRT_2))
    density = _INV_SQRT_2PI * jnp.exp(-0.5 * z * z)
    return da * (cdf + z * density)


def silu(z: Array) -> tuple[Array, Array]:
    """``a = z sigmoid(z)`` (SiLU, "swish"; as ``torch.nn.SiLU``); caches ``z``."""
    return z * jax.nn.sigmoid(z), z


def silu_backward(z: Array, da: Array) -> Array:
    """With ``s = sigmoid(z)``: ``phi'(z) = s + z s (1 - s) = s (1 + z (1 - s))``."""
    s = jax.nn.sigmoid(z)
    return da * (s * (1 + z * (1 - s)))


# Second derivatives, for the Hessian diagonal (:mod:`mnet.core.curvature`): ``phi''(z)`` from the same cache.
# ReLU, leaky ReLU and the identity have none (zero almost everywhere).


def elu_second(z: Array, alpha: float) -> Array:
    """``phi''(z) = 0`` for ``z > 0``, ``alpha * exp(z)`` otherwise."""
    return jnp.where(z > 0, jnp.zeros_like(z), alpha * jnp.exp(jnp.where(z > 0, jnp.zeros_like(z), z)))


def sigmoid_second(a: Array) -> Array:
    """``phi'' = (a (1 - a))' = a (1 - a) (1 - 2a)``."""
    return a * (1 - a) * (1 - 2 * a)


def tanh_second(a: Array) -> Array:
    """``phi'' = (1 - a^2)' = -2 a (1 - a^2)``."""
    return -2 * a * (1 - a * a)


def softplus_second(z: Array) -> Array:
    """``phi'' = sigmoid'(z) = s (1 - s)``."""
    s = jax.nn.sigmoid(z)
    return s * (1 - s)


def silu_second(z: Array) -> Array:
    """``phi'' = (s + z s')' = 2 s' + z s''`` with ``s' = s (1 - s)``, ``s'' = s' (1 - 2s)``:
    ``s (1 - s) (2 + z (1 - 2s))``."""
    s = jax.nn.sigmoid(z)
    return s * (1 - s) * (2 + z * (1 - 2 * s))


def gelu_second(z: Array, approximate: bool) -> Array:
    """Exact: ``phi''(z) = 2 phi(z) + z phi'(z) = phi(z) (2 - z^2)`` with ``phi`` the normal density.
    Tanh form: with ``u' = c (1 + 3k z^2)`` and ``u'' = 6 c k z``,
    ``phi''(z) = (1 - t^2) (u' + z (u'' - 2 t u'^2) / 2)``."""
    if approximate:
        t = jnp.tanh(_SQRT_2_OVER_PI * (z + _GELU_CUBIC * z**3))
        du = _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * z**2)
        ddu = 6 * _SQRT_2_OVER_PI * _GELU_CUBIC * z
        return (1 - t * t) * (du + 0.5 * z * (ddu - 2 * t * du * du))
    return _INV_SQRT_2PI * jnp.exp(-0.5 * z * z) * (2 - z * z)


def softmax(z: Array, axis: int = -1) -> tuple[Array, Array]:
    """``p = exp(z - max z) / sum exp(z - max z)`` along ``axis``; caches ``p``."""
    p = jax.nn.softmax(z, axis=axis)
    return p, p


def softmax_backward(p: Array, dp: Array, axis: int = -1) -> Array:
    """The softmax Jacobian is ``diag(p) - p p^T``, so its product with ``dp`` is
    ``dz = p * (dp - sum(dp * p))``: O(n) work, the n-by-n Jacobian is never built."""
    return p * (dp - jnp.sum(dp * p, axis=axis, keepdims=True))
