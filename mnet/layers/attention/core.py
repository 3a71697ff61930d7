"""The attention core in matrix algebra: per head ``S = Q K^T / sqrt(d)``, ``P = softmax(S)`` (masked), ``O = P V``,
with the softmax backward written out; no parameters (the projections are dense layers around it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax.numpy as jnp

from mnet.core.layer import Layer
from mnet.core.protocol import Array, Cache, Params, Shape


def key_mask(mask: Array | None) -> Array | None:
    """A padding mask ``(batch, T)`` (what a network's quantities pass down) as the key mask ``(batch, 1, 1, T)``;
    a rank-4 mask as it is."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    return mask[:, None, None, :] if mask.ndim == 2 else mask


@dataclass(frozen=True, repr=False)
class AttentionCore(Layer):
    """The parameterless heart of attention, on the concatenated projections ``[Q | K | V]`` of shape
    ``(batch, T, 3 * heads * d)``; returns the heads' outputs side by side, ``(batch, T, heads * d)``.

    Forward, per example and head (``Q, K, V``: ``(T, d)``; ``M``: the mask, True where a query may attend)::

        S = Q K^T / sqrt(d)                    (T, T) scores
        P = softmax(S) over each row, with P = 0 wherever M is False
        O = P V

    Backward, from ``dO``::

        dV = P^T dO
        dP = dO V^T
        dS = P * (dP - sum(dP * P, axis=-1, keepdims=True))   (the softmax's Jacobian-vector product)
        dQ = dS K / sqrt(d)
        dK = dS^T Q / sqrt(d)

    Masked entries have ``P = 0``, hence ``dS = 0``: the mask needs no separate backward. A query row whose
    every key is masked gets ``P = 0`` (output 0) rather than the NaN of an empty softmax.
    """

    num_heads: int
    head_dim: int
    causal: bool = False
    #: No parameters: ``diag_hessian`` builds the core's own curvature from :meth:`backward_tangent`.
    parameterless = True
    takes_mask = True

    def __repr__(self) -> str:
        return f"AttentionCore({self.num_heads}, {self.head_dim}{', causal=True' if self.causal else ''})"

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        return tuple(input_shape[:-1]) + (self.num_heads * self.head_dim,), ()

    def _heads(self, part: Array) -> Array:
        """``(batch, T, heads * d) -> (batch, heads, T, d)``."""
        batch, length, _ = part.shape
        return part.reshape(batch, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def _merge(self, heads: Array) -> Array:
        """``(batch, heads, T, d) -> (batch, T, heads * d)``, heads side by side."""
        batch, _, length, _ = heads.shape
        return heads.transpose(0, 2, 1, 3).reshape(batch, length, self.num_heads * self.head_dim)

    def forward(self, params: Params, qkv: Array, mask: Array | None = None) -> tuple[Array, Cache]:
        mask = key_mask(mask)
        Q, K, V = (self._heads(part) for part in jnp.split(qkv, 3, axis=-1))
        length = qkv.shape[1]
        S = jnp.einsum("bhsd,bhtd->bhst", Q, K) / math.sqrt(self.head_dim)
        allowed = jnp.ones((1, 1, length, length), bool)
        if self.causal:
            allowed = allowed & jnp.tril(jnp.ones((length, length), bool))
        if mask is not None:
            allowed = allowed & mask
        row_max = jnp.max(jnp.where(allowed, S, -jnp.inf), axis=-1, keepdims=True)
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0)
        E = jnp.where(allowed, jnp.exp(S - row_max), 0)
        total = jnp.sum(E, axis=-1, keepdims=True)
        P = E / jnp.where(total > 0, total, 1)
        O = jnp.einsum("bhst,bhtd->bhsd", P, V)
        return self._merge(O), (Q, K, V, P)

    def tangent(self, params: Params, cache: Cache, dparams: Params, dqkv: Array) -> Array:
        """Forward mode, from the tangents ``dQ, dK, dV``::

        dS = (dQ K^T + Q dK^T) / sqrt(d)
        dP = P * (dS - sum(dS * P, axis=-1, keepdims=True))     (masked entries: P = 0, so dP = 0)
        dO = dP V + P dV
        """
        Q, K, V, P = cache
        dQ, dK, dV = (self._heads(part) for part in jnp.split(dqkv, 3, axis=-1))
        dS = (jnp.einsum("bhsd,bhtd->bhst", dQ, K) + jnp.einsum("bhsd,bhtd->bhst", Q, dK)) / math.sqrt(self.head_dim)
        dP = P * (dS - jnp.sum(dS * P, axis=-1, keepdims=True))
        return self._merge(jnp.einsum("bhst,bhtd->bhsd", dP, V) + jnp.einsum("bhst,bhtd->bhsd", P, dV))

    def backward(self, params: Params, cache: Cache, dout: Array) -> tuple[Params, Array]:
        Q, K, V, P = cache
        dO = self._heads(dout)
        dV = jnp.einsum("bhst,bhsd->bhtd", P, dO)
        dP = jnp.einsum("bhsd,bhtd->bhst", dO, V)
        dS = P * (dP - jnp.sum(dP * P, axis=-1, keepdims=True))
        scale = 1 / math.sqrt(self.head_dim)
        dQ = jnp.einsum("bhst,bhtd->bhsd", dS, K) * scale
        dK = jnp.einsum("bhst,bhsd->bhtd", dS, Q) * scale
        return (), jnp.concatenate([self._merge(dQ), self._merge(dK), self._merge(dV)], axis=-1)

    def backward_tangent(
        self, params: Params, cache: Cache, tangents: tuple, dout: Array, dout_tangent: Array
    ) -> tuple[Params, Array, Array]:
        """The backward pass differentiated along the tangent (Hessian-vector products). With the tangents
        ``Q_t, K_t, V_t`` of the input and ``P_t`` of the probabilities (the forward rule, :meth:`tangent`)::

            R{dV} = P_t^T dO + P^T R{dO}                 R{dP} = R{dO} V^T + dO V_t^T
            R{dS} = P_t * (dP - r) + P * (R{dP} - rowsum(R{dP} * P + dP * P_t)),   r = rowsum(dP * P)
            R{dQ} = (R{dS} K + dS K_t) / sqrt(d)         R{dK} = (R{dS}^T Q + dS^T Q_t) / sqrt(d)
        """
        Q, K, V, P = cache
        _, dx = self.backward(params, cache, dout)
        _, dx_tangent = self.backward(params, cache, dout_tangent)
        qkv_tangent = tangents[1]
        if qkv_tangent is None:
            return (), dx, dx_tangent
        scale = 1 / math.sqrt(self.head_dim)
        Q_t, K_t, V_t = (self._heads(part) for part in jnp.split(qkv_tangent, 3, axis=-1))
        S_t = (jnp.einsum("bhsd,bhtd->bhst", Q_t, K) + jnp.einsum("bhsd,bhtd->bhst", Q, K_t)) * scale
        P_t = P * (S_t - jnp.sum(S_t * P, axis=-1, keepdims=True))
        dO = self._heads(dout)
        dP = jnp.einsum("bhsd,bhtd->bhst", dO, V)
        dS = P * (dP - jnp.sum(dP * P, axis=-1, keepdims=True))
        # The terms that the backward pass of R{dO} (already in dx_tangent) leaves out: those through P_t, V_t, K_t, Q_t.
        dP_extra = jnp.einsum("bhsd,bhtd->bhst", dO, V_t)
        dS_extra = P_t * (dP - jnp.sum(dP * P, axis=-1, keepdims=True)) + P * (
            dP_extra - jnp.sum(dP_extra * P + dP * P_t, axis=-1, keepdims=True)
        )
        dQ_extra = (jnp.einsum("bhst,bhtd->bhsd", dS_extra, K) + jnp.einsum("bhst,bhtd->bhsd", dS, K_t)) * scale
        dK_extra = (jnp.einsum("bhst,bhsd->bhtd", dS_extra, Q) + jnp.einsum("bhst,bhsd->bhtd", dS, Q_t)) * scale
        dV_extra = jnp.einsum("bhst,bhsd->bhtd", P_t, dO)
        extra = jnp.concatenate([self._merge(dQ_extra), self._merge(dK_extra), self._merge(dV_extra)], axis=-1)
        return (), dx, dx_tangent + extra
