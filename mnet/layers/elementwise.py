"""Activation layers ``a = phi(z)``: parameterless, shape-preserving, each derivative beside its function (the pairs
live in :mod:`mnet.activations`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import jax.numpy as jnp

from mnet import activations
from mnet.core.curvature import Curvature, no_rule, position_columns
from mnet.core.layer import Layer
from mnet.core.protocol import Array, Cache, Params, Shape


class Elementwise(Layer):
    """A parameterless layer ``a = phi(z)`` applied entry by entry; ``da -> dz = da * phi'(z)``.

    Subclasses define ``activate(z) -> (a, cache)`` and ``activate_backward(cache, da) -> dz`` from the pairs
    in :mod:`mnet.activations`, and ``activate_second(cache) -> phi''(z)`` (None where it is zero) for the Hessian.

    Second order: ``J = diag(phi'(z))`` and the layer's own curvature is ``diag(phi''(z) g)``, ``g`` the gradient
    reaching ``a``, so the Hessian at ``z`` is ``diag(phi') H_a diag(phi') + diag(phi'' g)``: columns scaled by
    ``phi'``, the diagonal by ``phi'^2``, plus a diagonal (:mod:`mnet.core.curvature`).
    """

    def activate(self, z: Array) -> tuple[Array, Cache]:
        raise NotImplementedError

    def activate_backward(self, cache: Cache, da: Array) -> Array:
        raise NotImplementedError

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        return self._check_input_shape(input_shape), ()

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        self._check_input(x, min_rank=1)
        self._check_no_params(params)
        return self.activate(x)

    def backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        return (), self.activate_backward(cache, dy)

    def activate_second(self, cache: Cache) -> Array | None:
        raise no_rule(self)

    def tangent(self, params: Params, cache: Cache, dparams: Params, dz: Array) -> Array:
        """``da = phi'(z) * dz``: the Jacobian is diagonal, hence symmetric, so the forward rule is the backward
        one (for Softmax too: ``diag(p) - p p^T`` is symmetric)."""
        return self.activate_backward(cache, dz)

    def backward_tangent(
        self, params: Params, cache: Cache, tangents: tuple, da: Array, da_tangent: Array
    ) -> tuple[Params, Array, Array]:
        """``dz = phi'(z) da``, differentiated: ``R{dz} = phi'(z) R{da} + phi''(z) R{z} da``."""
        dz_tangent = self.activate_backward(cache, da_tangent)
        z_tangent = tangents[1]
        second = self.activate_second(cache)
        if z_tangent is not None and second is not None:
            dz_tangent = dz_tangent + second * z_tangent * da
        return (), self.activate_backward(cache, da), dz_tangent

    def diag_hessian(self, params: Params, cache: Cache, curvature: Curvature) -> tuple[Params, Curvature]:
        second = self.activate_second(cache)

        def scale(v: Array) -> Array:
            return self.activate_backward(cache, v)

        below = curvature.through(scale, diagonal=lambda d: scale(scale(d)))
        return (), below.plus_diagonal(None if second is None else second * curvature.grad)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass(frozen=True, repr=False)
class Identity(Elementwise):
    """``a = z``; ``dz = da``."""

    def activate(self, z):
        return activations.identity(z)

    def activate_backward(self, cache, da):
        return activations.identity_backward(cache, da)

    def activate_second(self, cache):
        return None


@dataclass(frozen=True, repr=False)
class Relu(Elementwise):
    """``a = max(z, 0)``; ``dz = da * [z > 0]`` (caches the mask)."""

    def activate(self, z):
        return activations.relu(z)

    def activate_backward(self, mask, da):
        return activations.relu_backward(mask, da)

    def activate_second(self, mask):
        return None


@dataclass(frozen=True, repr=False)
class LeakyRelu(Elementwise):
    """``a = z`` if ``z >= 0`` else ``slope * z``; ``dz = da`` or ``slope * da`` (caches the mask)."""

    slope: float = 0.01

    def __repr__(self) -> str:
        return f"LeakyRelu(slope={self.slope})"

    def activate(self, z):
        return activations.leaky_relu(z, self.slope)

    def activate_backward(self, mask, da):
        return activations.leaky_relu_backward(mask, da, self.slope)

    def activate_second(self, mask):
        return None


@dataclass(frozen=True, repr=False)
class Elu(Elementwise):
    """``a = z`` if ``z > 0`` else ``alpha (e^z - 1)``; ``dz = da`` or ``da * alpha e^z`` (caches ``z``)."""

    alpha: float = 1.0

    def __repr__(self) -> str:
        return f"Elu(alpha={self.alpha})"

    def activate(self, z):
        return activations.elu(z, self.alpha)

    def activate_backward(self, z, da):
        return activations.elu_backward(z, da, self.alpha)

    def activate_second(self, z):
        return activations.elu_second(z, self.alpha)


@dataclass(frozen=True, repr=False)
class Sigmoid(Elementwise):
    """``a = 1 / (1 + e^-z)``; ``dz = da * a (1 - a)`` (caches ``a``)."""

    def activate(self, z):
        return activations.sigmoid(z)

    def activate_backward(self, a, da):
        return activations.sigmoid_backward(a, da)

    def activate_second(self, a):
        return activations.sigmoid_second(a)


@dataclass(frozen=True, repr=False)
class Tanh(Elementwise):
    """``a = tanh z``; ``dz = da * (1 - a^2)`` (caches ``a``)."""

    def activate(self, z):
        return activations.tanh(z)

    def activate_backward(self, a, da):
        return activations.tanh_backward(a, da)

    def activate_second(self, a):
        return activations.tanh_second(a)


@dataclass(frozen=True, repr=False)
class Softplus(Elementwise):
    """``a = log(1 + e^z)``; ``dz = da * sigmoid(z)`` (caches ``z``)."""

    def activate(self, z):
        return activations.softplus(z)

    def activate_backward(self, z, da):
        return activations.softplus_backward(z, da)

    def activate_second(self, z):
        return activations.softplus_second(z)


@dataclass(frozen=True, repr=False)
class Gelu(Elementwise):
    """``a = z Phi(z)``; ``dz = da * (Phi(z) + z phi(z))`` (caches ``z``).

    ``approximate=False`` (default) is the exact erf form, as PyTorch's default; note that
    ``jax.nn.gelu`` defaults to the tanh approximation, which ``Gelu(approximate=True)`` gives.
    """

    approximate: bool = False

    def __repr__(self) -> str:
        return f"Gelu(approximate={self.approximate})" if self.approximate else "Gelu()"

    def activate(self, z):
        return activations.gelu(z, self.approximate)

    def activate_backward(self, z, da):
        return activations.gelu_backward(z, da, self.approximate)

    def activate_second(self, z):
        return activations.gelu_second(z, self.approximate)


@dataclass(frozen=True, repr=False)
class Silu(Elementwise):
    """``a = z sigmoid(z)`` (SiLU, as ``torch.nn.SiLU``); ``dz = da * s (1 + z (1 - s))``, ``s = sigmoid(z)``
    (caches ``z``)."""

    def activate(self, z):
        return activations.silu(z)

    def activate_backward(self, z, da):
        return activations.silu_backward(z, da)

    def activate_second(self, z):
        return activations.silu_second(z)


@dataclass(frozen=True, repr=False)
class Softmax(Elementwise):
    """``p = softmax(z)`` over the last axis; ``dz = p * (dp - sum(dp * p))`` (caches ``p``).

    Not elementwise in the strict sense (each output depends on the whole row), but parameterless and
    shape-preserving alike; its backward is the Jacobian-vector product of ``diag(p) - p p^T`` computed in
    O(n) without building the Jacobian. To train a classifier, prefer a linear last layer with
    ``losses.softmax_cross_entropy``, which fuses the two and is stable for any logits.
    """

    def activate(self, z):
        return activations.softmax(z)

    def activate_backward(self, p, dp):
        return activations.softmax_backward(p, dp)

    def backward_tangent(self, params, p, tangents, dp, dp_tangent):
        """``dz = p * (dp - <p, dp>)``, differentiated with ``R{p} = p * (R{z} - <p, R{z}>)`` (the forward rule):
        ``R{dz} = R{p} * (dp - <p, dp>) + p * (R{dp} - <R{p}, dp> - <p, R{dp}>)``."""
        z_tangent = tangents[1]
        dz_tangent = self.activate_backward(p, dp_tangent)
        if z_tangent is not None:
            p_tangent = self.activate_backward(p, z_tangent)
            inner = jnp.sum(p * dp, axis=-1, keepdims=True)
            dz_tangent = dz_tangent + p_tangent * (dp - inner) - p * jnp.sum(p_tangent * dp, axis=-1, keepdims=True)
        return (), self.activate_backward(p, dp), dz_tangent

    def diag_hessian(self, params, p, curvature):
        """``J^T H_p J`` through the backward (``J = diag(p) - p p^T`` is not diagonal, so every set is expanded),
        plus the softmax's own curvature at each position: with ``v = p * (g - <g, p>)`` (the backward of the
        gradient ``g`` reaching ``p``), the Hessian of ``<g, p(z)>`` is ``diag(v) - (v p^T + p v^T)``, whose
        rank-two part is ``-1/2 (v + p)(v + p)^T + 1/2 (v - p)(v - p)^T``: ``v`` joins the diagonal, the two squares
        become signed columns (:func:`mnet.core.curvature.position_columns`)."""
        below = curvature.through(lambda v: self.activate_backward(p, v))
        v = self.activate_backward(p, curvature.grad)
        own = position_columns([(v + p, 0.5, -1.0), (v - p, 0.5, 1.0)])
        below = below.plus_diagonal(v)
        return (), replace(below, groups=below.groups + (own,))


ACTIVATIONS_BY_NAME: dict[str, type[Elementwise]] = {
    "relu": Relu,
    "leaky_relu": LeakyRelu,
    "elu": Elu,
    "gelu": Gelu,
    "sigmoid": Sigmoid,
    "tanh": Tanh,
    "softplus": Softplus,
    "silu": Silu,
    "identity": Identity,
}
