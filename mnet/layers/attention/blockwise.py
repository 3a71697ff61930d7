"""Attention computed over blocks of keys and queries, keeping no ``T x T`` array: the online-softmax recurrence
(Rabe and Staats 2021; Dao et al. 2022, FlashAttention) in matrix algebra, with its backward derived by hand.

Forward. Split the ``T`` queries and keys into blocks of ``B`` (the last ones padded; padded keys are masked).
For a query block ``q`` (``(B, d)``) sweep the key blocks ``j`` with a running row maximum ``m``, row sum ``l`` and
unnormalised output ``a``::

    s_j = q k_j^T / sqrt(d)                  (B, B), masked entries -inf
    m'  = max(m, rowmax(s_j))
    p_j = exp(s_j - m')                      (masked entries 0)
    l   = l exp(m - m') + rowsum(p_j)
    a   = a exp(m - m') + p_j v_j
    m   = m'

and at the end ``O = a / l`` and ``L = m + log l``, the row's log-sum-exp. That is softmax attention exactly:
``P = exp(S - L)`` and ``O = P V``. The cache holds ``Q, K, V, O, L``: O(T d) numbers instead of the ``T x T``
probabilities. A row with no allowed key gets ``O = 0`` and ``L = +inf`` (so every recomputed ``P`` is 0), as
the unblocked layer gives it ``P = 0``.

Backward, from ``dO``, with the unblocked rules (``dS = P * (dP - rowsum(dP * P))``) rewritten so that no row sum
over all keys is needed: ``rowsum(dP * P) = rowsum(dO * (P V)) = rowsum(dO * O) =: D``, known before the sweep.
Then for every pair of blocks, with ``p = exp(s - L_q)`` recomputed from the cache::

    dv_j += p^T dO_q          dp = dO_q v_j^T          ds = p * (dp - D_q)
    dq_q += ds k_j / sqrt(d)  dk_j += ds^T q / sqrt(d)

The sweep runs over key blocks outside (``dk_j``, ``dv_j`` accumulate in the loop) and query blocks inside
(``dq`` accumulates into its block of the whole ``dQ``). With ``causal=True`` a key block after the query block
is entirely masked and skipped (a ``lax.cond``): only the pairs ``j <= i`` are computed, about half.

Forward mode and the Hessian-vector rule use the same sweeps; their derivations are on the methods. The
recomputation in the backward reads the cache through ``lax.optimization_barrier``, so that XLA cannot merge it
into the forward pass and keep the probabilities alive after all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from mnet.core.layer import positive_int
from mnet.core.protocol import Array, Cache, Params
from mnet.layers.attention.core import AttentionCore, key_mask


@dataclass(frozen=True, repr=False)
class BlockwiseAttentionCore(AttentionCore):
    """:class:`AttentionCore` computed in blocks of ``block_size`` queries and keys (see the module's docstring
    for the forward and backward recurrences). Same input ``[Q | K | V]``, same output, same mask convention;
    results equal the unblocked core's to rounding. The cache is ``(Q, K, V, O, L, mask)`` in blocks."""

    block_size: int = 128

    def __post_init__(self):
        positive_int(self.block_size, "block_size", "BlockwiseAttentionCore")

    def __repr__(self) -> str:
        causal = ", causal=True" if self.causal else ""
        return f"BlockwiseAttentionCore({self.num_heads}, {self.head_dim}{causal}, block_size={self.block_size})"

    # --- layout -------------------------------------------------------------------------------------------------

    def _blocks(self, heads: Array) -> Array:
        """``(batch, heads, T, d) -> (n_blocks, batch, heads, B, d)``, zero-padded to a whole number of blocks (a
        leading block axis, so that picking block ``i`` is one dynamic index)."""
        batch, n_heads, length, width = heads.shape
        n_blocks = -(-length // self.block_size)
        padded = jnp.pad(heads, ((0, 0), (0, 0), (0, n_blocks * self.block_size - length), (0, 0)))
        return padded.reshape(batch, n_heads, n_blocks, self.block_size, width).transpose(2, 0, 1, 3, 4)

    def _unblocked(self, blocks: Array, length: int) -> Array:
        """The inverse of :meth:`_blocks`, merged back to ``(batch, T, heads * d)``."""
        n_blocks, batch, n_heads, size, width = blocks.shape
        heads = blocks.transpose(1, 2, 0, 3, 4).reshape(batch, n_heads, n_blocks * size, width)
        return self._merge(heads[:, :, :length])

    def _split(self, qkv: Array) -> tuple[Array, Array, Array]:
        return tuple(self._blocks(self._heads(part)) for part in jnp.split(qkv, 3, axis=-1))  # type: ignore[return-value]

    def _padded_mask(self, mask: Array | None, length: int) -> Array | None:
        """The user's mask as a rank-4 boolean array, its query and key axes (where not broadcast) padded with
        False to the blocks' length; kept at its own (broadcastable) shape, never expanded."""
        mask = key_mask(mask)
        if mask is None:
            return None
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        padded = -(-length // self.block_size) * self.block_size
        pad = [(0, 0), (0, 0)] + [(0, padded - length if size > 1 else 0) for size in mask.shape[2:]]
        return jnp.pad(mask, pad, constant_values=False)

    def _allowed(self, mask: Array | None, length: int, i: Array, j: Array) -> Array:
        """Which entries of the block pair (query block ``i``, key block ``j``) may attend: real keys, the causal
        triangle, the user's mask; broadcastable to ``(batch, heads, B, B)``."""
        size = self.block_size
        rows = i * size + jnp.arange(size)
        cols = j * size + jnp.arange(size)
        allowed = jnp.broadcast_to(cols < length, (size, size))
        if self.causal:
            allowed = allowed & (cols[None, :] <= rows[:, None])
        if mask is not None:
            block = mask
            if mask.shape[2] > 1:
                block = lax.dynamic_slice_in_dim(block, i * size, size, axis=2)
            if mask.shape[3] > 1:
                block = lax.dynamic_slice_in_dim(block, j * size, size, axis=3)
            allowed = allowed & block
        return allowed

    def _probabilities(self, mask, length, i, j, q, k, logsumexp) -> Array:
        """``p = exp(q k^T / sqrt(d) - L)`` of a block pair, recomputed from the cache; 0 where masked."""
        s = jnp.einsum("bhsd,bhtd->bhst", q, k) / math.sqrt(self.head_dim)
        return jnp.where(self._allowed(mask, length, i, j), jnp.exp(s - logsumexp[..., None]), 0)

    def _score_tangent(self, q, k, q_t, k_t) -> Array:
        """``S_t = (Q_t K^T + Q K_t^T) / sqrt(d)`` of a block pair: the tangent of the scores."""
        return (jnp.einsum("bhsd,bhtd->bhst", q_t, k) + jnp.einsum("bhsd,bhtd->bhst", q, k_t)) / math.sqrt(
            self.head_dim
        )

    # --- the two sweeps -----------------------------------------------------------------------------------------
    # Both loops have static bounds, so that JAX can differentiate the forward pass in reverse (autodiff is the
    # referee of every hand rule); the causal skip is a ``lax.cond``, which stays a branch under ``vmap`` because
    # the block indices are never batched.

    def _if_visible(self, i: Array, j: Array, step: Callable, state: Any) -> Any:
        """``step(i, j, state)`` if query block ``i`` sees any key of block ``j``, else ``state`` unchanged."""
        if not self.causal:
            return step(i, j, state)
        return lax.cond(j <= i, lambda state: step(i, j, state), lambda state: state, state)

    def _over_queries(self, n_blocks: int, step: Callable, init: Callable) -> Any:
        """For every query block ``i``: ``state = step(i, j, state)`` over the key blocks it sees (all, or
        ``j <= i`` when causal), from ``init(i)``; the final states stacked along a leading block axis."""

        def one_query_block(i):
            return lax.fori_loop(0, n_blocks, lambda j, state: self._if_visible(i, j, step, state), init(i))

        return lax.map(one_query_block, jnp.arange(n_blocks))

    def _over_keys(self, n_blocks: int, step: Callable, query_totals: Any, key_init: Any) -> tuple[Any, Any]:
        """For every key block ``j`` (outside) and query block ``i`` it is seen by (inside):
        ``(query_part, key_state) = step(i, j, key_state)``, where ``query_part`` is added into block ``i`` of
        ``query_totals`` (leaves ``(n_blocks, ...)``). Returns ``(query_totals, key states stacked by block)``."""

        def one_key_block(totals, j):
            def inner(i, j, carry):
                totals, state = carry
                part, state = step(i, j, state)
                totals = jax.tree_util.tree_map(lambda total, p: total.at[i].add(p), totals, part)
                return totals, state

            return lax.fori_loop(0, n_blocks, lambda i, carry: self._if_visible(i, j, inner, carry), (totals, key_init))

        return lax.scan(one_key_block, query_totals, jnp.arange(n_blocks))

    # --- rules --------------------------------------------------------------------------------------------------

    def forward(self, params: Params, qkv: Array, mask: Array | None = None) -> tuple[Array, Cache]:
        length = qkv.shape[1]
        Q, K, V = self._split(qkv)
        mask = self._padded_mask(mask, length)
        rows = Q.shape[1:-1]

        def step(i, j, state):
            row_max, row_sum, acc = state
            s = jnp.einsum("bhsd,bhtd->bhst", Q[i], K[j]) / math.sqrt(self.head_dim)
            allowed = self._allowed(mask, length, i, j)
            new_max = jnp.maximum(row_max, jnp.max(jnp.where(allowed, s, -jnp.inf), axis=-1))
            shift = jnp.where(jnp.isfinite(new_max), new_max, 0)
            p = jnp.where(allowed, jnp.exp(s - shift[..., None]), 0)
            decay = jnp.exp(row_max - shift)  # 0 while nothing was allowed (row_max = -inf)
            acc = acc * decay[..., None] + jnp.einsum("bhst,bhtd->bhsd", p, V[j])
            return new_max, row_sum * decay + jnp.sum(p, axis=-1), acc

        def init(i):
            return jnp.full(rows, -jnp.inf, Q.dtype), jnp.zeros(rows, Q.dtype), jnp.zeros(Q.shape[1:], Q.dtype)

        row_max, row_sum, acc = self._over_queries(Q.shape[0], step, init)
        seen = row_sum > 0
        O = acc / jnp.where(seen, row_sum, 1)[..., None]
        logsumexp = jnp.where(seen, row_max + jnp.log(jnp.where(seen, row_sum, 1)), jnp.inf)
        return self._unblocked(O, length), (Q, K, V, O, logsumexp, mask)

    def backward(self, params: Params, cache: Cache, dout: Array) -> tuple[Params, Array]:
        _, dqkv, _ = self._backward_sweep(cache, dout, None)
        return (), dqkv

    def _backward_sweep(self, cache: Cache, dout: Array, tangents: tuple | None) -> tuple[Params, Array, Any]:
        """The backward sweep, and with ``tangents = (Q_t, K_t, V_t, dO_t, c, RD)`` (blocks; see
        :meth:`backward_tangent`) its derivative along them in the same pass. Returns ``((), dqkv, R{dqkv})``."""
        Q, K, V, O, logsumexp, mask = lax.optimization_barrier(cache)
        length = dout.shape[1]
        scale = 1 / math.sqrt(self.head_dim)
        dO = self._blocks(self._heads(dout))
        D = jnp.sum(dO * O, axis=-1)

        def step(i, j, key_state):
            p = self._probabilities(mask, length, i, j, Q[i], K[j], logsumexp[i])
            dp = jnp.einsum("bhsd,bhtd->bhst", dO[i], V[j])
            ds = p * (dp - D[i][..., None])
            dq = jnp.einsum("bhst,bhtd->bhsd", ds, K[j]) * scale
            dk = jnp.einsum("bhst,bhsd->bhtd", ds, Q[i]) * scale
            dv = jnp.einsum("bhst,bhsd->bhtd", p, dO[i])
            if tangents is None:
                return (dq,), jax.tree_util.tree_map(jnp.add, key_state, (dk, dv))
            Q_t, K_t, V_t, dO_t, c, RD = tangents
            p_t = p * (self._score_tangent(Q[i], K[j], Q_t[i], K_t[j]) - c[i][..., None])
            rdp = jnp.einsum("bhsd,bhtd->bhst", dO_t[i], V[j]) + jnp.einsum("bhsd,bhtd->bhst", dO[i], V_t[j])
            rds = p_t * (dp - D[i][..., None]) + p * (rdp - RD[i][..., None])
            rdq = (jnp.einsum("bhst,bhtd->bhsd", rds, K[j]) + jnp.einsum("bhst,bhtd->bhsd", ds, K_t[j])) * scale
            rdk = (jnp.einsum("bhst,bhsd->bhtd", rds, Q[i]) + jnp.einsum("bhst,bhsd->bhtd", ds, Q_t[i])) * scale
            rdv = jnp.einsum("bhst,bhsd->bhtd", p_t, dO[i]) + jnp.einsum("bhst,bhsd->bhtd", p, dO_t[i])
            return (dq, rdq), jax.tree_util.tree_map(jnp.add, key_state, (dk, dv, rdk, rdv))

        parts = 1 if tangents is None else 2
        zeros = jnp.zeros(K.shape[1:], K.dtype)
        query_totals, key_states = self._over_keys(
            Q.shape[0], step, (jnp.zeros_like(Q),) * parts, (zeros,) * (2 * parts)
        )

        def merged(dq: Array, dk: Array, dv: Array) -> Array:
            return jnp.concatenate([self._unblocked(part, length) for part in (dq, dk, dv)], axis=-1)

        dqkv = merged(query_totals[0], *key_states[:2])
        return (), dqkv, None if tangents is None else merged(query_totals[1], *key_states[2:])

    def tangent(self, params: Params, cache: Cache, dparams: Params, dqkv: Array) -> Array:
        """Forward mode. With ``S_t = (Q_t K^T + Q K_t^T) / sqrt(d)``, ``P_t = P * (S_t - c)`` where
        ``c = rowsum(P * S_t)`` (the tangent of ``L``), so ``O_t = P_t V + P V_t = (P * S_t) V + P V_t - c O``:
        one sweep over key blocks accumulates ``(P * S_t) V + P V_t`` and ``c``."""
        Q, K, V, O, logsumexp, mask = cache
        length = dqkv.shape[1]
        Q_t, K_t, V_t = self._split(dqkv)

        def step(i, j, state):
            acc, c = state
            p = self._probabilities(mask, length, i, j, Q[i], K[j], logsumexp[i])
            ps_t = p * self._score_tangent(Q[i], K[j], Q_t[i], K_t[j])
            acc = acc + jnp.einsum("bhst,bhtd->bhsd", ps_t, V[j]) + jnp.einsum("bhst,bhtd->bhsd", p, V_t[j])
            return acc, c + jnp.sum(ps_t, axis=-1)

        acc, c = self._over_queries(Q.shape[0], step, lambda i: (jnp.zeros_like(Q[0]), jnp.zeros_like(logsumexp[0])))
        return self._unblocked(acc - c[..., None] * O, length)

    def backward_tangent(
        self, params: Params, cache: Cache, tangents: tuple, dout: Array, dout_tangent: Array
    ) -> tuple[Params, Array, Array]:
        """The backward pass differentiated along the tangent, in two sweeps. The unblocked rule
        (:meth:`AttentionCore.backward_tangent`) needs, per query row, ``c = rowsum(P * S_t)`` (for
        ``P_t = P * (S_t - c)``) and ``R{D} = rowsum(R{dP} * P + dP * P_t)``. The first sweep (over key blocks
        for each query block) accumulates ``c``, ``u = rowsum(dO * (P V_t))`` and ``e = rowsum(dP * P * S_t)``,
        from which ``R{D} = rowsum(R{dO} * O) + u + e - c D``; the second is the backward sweep carrying the
        tangent terms (``R{dV} = P_t^T dO + P^T R{dO}``, ``R{dS} = P_t * (dP - D) + P * (R{dP} - R{D})``, ...)."""
        qkv_tangent = tangents[1]
        if qkv_tangent is None:  # the backward is linear in dO
            return (), self.backward(params, cache, dout)[1], self.backward(params, cache, dout_tangent)[1]
        Q, K, V, O, logsumexp, mask = cache
        length = dout.shape[1]
        Q_t, K_t, V_t = self._split(qkv_tangent)
        dO, dO_t = (self._blocks(self._heads(part)) for part in (dout, dout_tangent))

        def step(i, j, state):
            c, u, e = state
            p = self._probabilities(mask, length, i, j, Q[i], K[j], logsumexp[i])
            ps_t = p * self._score_tangent(Q[i], K[j], Q_t[i], K_t[j])
            dp = jnp.einsum("bhsd,bhtd->bhst", dO[i], V[j])
            u = u + jnp.sum(dO[i] * jnp.einsum("bhst,bhtd->bhsd", p, V_t[j]), axis=-1)
            return c + jnp.sum(ps_t, axis=-1), u, e + jnp.sum(dp * ps_t, axis=-1)

        zeros = jnp.zeros_like(logsumexp[0])
        c, u, e = self._over_queries(Q.shape[0], step, lambda i: (zeros, zeros, zeros))
        D = jnp.sum(dO * O, axis=-1)
        RD = jnp.sum(dO_t * O, axis=-1) + u + e - c * D
        return self._backward_sweep(cache, dout, (Q_t, K_t, V_t, dO_t, c, RD))
