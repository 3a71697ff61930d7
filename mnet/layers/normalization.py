"""Layer normalisation: each example normalised over its last axis, then scaled and shifted."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from mnet.layers.base import Array, Cache, Layer, Params, Shape, default_float_dtype, describe


@dataclass(frozen=True, repr=False)
class LayerNorm(Layer):
    """Normalise each example over its last axis, then scale and shift: ``y = gamma * xhat + beta``.

    Forward, per row of ``n`` features::

        mu = mean(x),  var = mean((x - mu)^2),  r = 1 / sqrt(var + eps),  xhat = (x - mu) r

    Backward: ``dgamma = sum(dy * xhat)`` and ``dbeta = sum(dy)`` over every row; with ``g = dy * gamma`` the
    closed form of the normalisation's Jacobian-vector product is ::

        dx = r * (g - mean(g) - xhat * mean(g * xhat))

    (the two means remove the components along the directions that normalisation itself removed: the constant
    vector and ``xhat``). Cache: ``xhat`` and ``r``.

    Arguments:
        eps: added to the variance (default 1e-5, as PyTorch).
    """

    eps: float = 1e-5

    def __repr__(self) -> str:
        return "LayerNorm()" if self.eps == 1e-5 else f"LayerNorm(eps={self.eps})"

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        shape = self._check_input_shape(input_shape)
        dtype = default_float_dtype() if dtype is None else dtype
        return shape, {"gamma": jnp.ones(shape[-1:], dtype), "beta": jnp.zeros(shape[-1:], dtype)}

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        self._check_input(x)
        if not isinstance(params, dict) or set(params) != {"gamma", "beta"}:
            raise self._fail(f"expects params with keys ['beta', 'gamma'], got {describe(params)}")
        if params["gamma"].shape != x.shape[-1:]:
            raise self._fail(f"expects input width {params['gamma'].shape[0]}, got input of shape {tuple(x.shape)}")
        centred = x - jnp.mean(x, axis=-1, keepdims=True)
        rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        xhat = centred * rstd
        return params["gamma"] * xhat + params["beta"], (xhat, rstd)

    def backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        xhat, rstd = cache
        n = xhat.shape[-1]
        grads = {"gamma": jnp.sum((dy * xhat).reshape(-1, n), axis=0), "beta": jnp.sum(dy.reshape(-1, n), axis=0)}
        return grads, self._dx(params, xhat, rstd, dy)

    def _dx(self, params: Params, xhat: Array, rstd: Array, dy: Array) -> Array:
        return _normalized(xhat, rstd, dy * params["gamma"])

    def tangent(self, params: Params, cache: Cache, dparams: Params, dx: Array | None) -> Array:
        """``dy = gamma * N dx + xhat * dgamma + dbeta`` with ``N = rstd (I - 11^T / n - xhat xhat^T / n)``, the
        Jacobian of ``xhat`` in ``x``: it is symmetric, so the forward rule applies the backward one's map."""
        xhat, rstd = cache
        dy = xhat * dparams["gamma"] + dparams["beta"]
        return dy if dx is None else dy + params["gamma"] * _normalized(xhat, rstd, dx)

    def backward_tangent(
        self, params: Params, cache: Cache, tangents: tuple, dy: Array, dy_tangent: Array
    ) -> tuple[Params, Array, Array]:
        """The backward pass differentiated along the tangent (Hessian-vector products). With ``R{x} = x_t``,
        ``R{xhat} = N x_t``, ``R{rstd} = -rstd^2 mean(xhat x_t)`` and ``g = gamma * dy``::

            R{dgamma} = sum(R{dy} xhat + dy R{xhat})        R{dbeta} = sum(R{dy})
            R{dx} = N (gamma R{dy} + R{gamma} dy) - rstd mean(xhat x_t) N g
                    - rstd (R{xhat} mean(g xhat) + xhat mean(g R{xhat}))
        """
        xhat, rstd = cache
        dparams, x_tangent = tangents
        n = xhat.shape[-1]
        g = dy * params["gamma"]
        dx = _normalized(xhat, rstd, g)
        hv, dx_tangent = self.backward(params, cache, dy_tangent)
        dx_tangent = dx_tangent + _normalized(xhat, rstd, dy * dparams["gamma"])
        if x_tangent is not None:
            xhat_tangent = _normalized(xhat, rstd, x_tangent)
            hv["gamma"] = hv["gamma"] + jnp.sum((dy * xhat_tangent).reshape(-1, n), axis=0)
            dx_tangent = dx_tangent - rstd * (
                jnp.mean(xhat * x_tangent, axis=-1, keepdims=True) * dx
                + xhat_tangent * jnp.mean(g * xhat, axis=-1, keepdims=True)
                + xhat * jnp.mean(g * xhat_tangent, axis=-1, keepdims=True)
            )
        return hv, dx, dx_tangent

    def per_example_backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        """Example ``b``'s own ``dgamma_b = sum(dy_b * xhat_b)``, ``dbeta_b = sum(dy_b)`` over its positions."""
        xhat, rstd = cache
        batch, n = dy.shape[0], xhat.shape[-1]
        grads = {
            "gamma": jnp.sum((dy * xhat).reshape(batch, -1, n), axis=1),
            "beta": jnp.sum(dy.reshape(batch, -1, n), axis=1),
        }
        return grads, self._dx(params, xhat, rstd, dy)


def _normalized(xhat: Array, rstd: Array, v: Array) -> Array:
    """``N v = rstd (v - mean(v) - xhat mean(v xhat))`` over the last axis: the symmetric Jacobian of
    ``xhat = (x - mean x) rstd`` applied to ``v``."""
    return rstd * (v - jnp.mean(v, axis=-1, keepdims=True) - xhat * jnp.mean(v * xhat, axis=-1, keepdims=True))
