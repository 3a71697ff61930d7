"""Multi-head self-attention in matrix algebra: three dense projections, the attention core with its softmax
backward written out, and an output projection; every derivative walks through the four parts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax.numpy as jnp

from mnet.errors import LayerError
from mnet.layers.base import Array, Cache, Compound, Layer, Params, Shape, check_param_keys, positive_int
from mnet.layers.combinators import Parallel, Serial
from mnet.layers.dense import Dense


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


@dataclass(frozen=True, repr=False)
class MultiHeadSelfAttention(Compound):
    """Multi-head self-attention over sequences ``x`` of shape ``(batch, T, D)``::

        Q = x Wq + bq,  K = x Wk + bk,  V = x Wv + bv          (batch, T, heads * head_dim) each
        O_h = softmax(Q_h K_h^T / sqrt(head_dim), masked) V_h    per head h (see AttentionCore)
        y = [O_1 ... O_heads] Wo + bo                            (batch, T, out_dim)

    The layer is the network ``serial(parallel(Dense, Dense, Dense), AttentionCore, Dense)`` (:meth:`network`)
    with its params renamed, and every derivative walks through those parts. Backward: the output projection's
    dense backward gives ``dO``; the core's backward (the softmax rule ``dS = P * (dP - sum(dP * P))`` and the
    products around it) gives ``dQ, dK, dV``; each input projection's dense backward gives its weights' gradients
    and its share of ``dx``, and ``dx`` is the sum of the three shares (``x`` feeds all three). Per-example
    gradients, their norms and the NTK come from the same parts: the dense layers' rules with the ``T`` positions
    of every example.

    Params: ``{"q": {"W", "b"}, "k": ..., "v": ..., "o": ...}``, each a :class:`mnet.Dense`'s params
    (``Wq: (D, heads * head_dim)``, ``Wo: (heads * head_dim, out_dim)``).

    ``forward(params, x, mask=None)``: ``mask`` is a boolean array broadcastable to ``(batch, heads, T, T)``,
    True where query ``s`` may attend to key ``t`` (e.g. ``valid[:, None, None, :]`` for padded sequences);
    ``causal=True`` also masks every key after the query. Inside ``serial`` only ``causal`` applies.

    Arguments:
        num_heads: number of heads.
        head_dim: width of each head (default: ``D // num_heads``, and then ``num_heads`` must divide ``D``).
        causal: mask the future (for autoregressive models).
        out_dim: output width (default ``D``, so that the layer fits in a residual block).
        use_bias: biases in the four projections (default True).
        block_size: compute the core in blocks of this many queries and keys
            (:class:`mnet.layers.blockwise_attention.BlockwiseAttentionCore`): the cache then holds ``Q, K, V``, the
            output and one log-sum-exp per query instead of the ``T x T`` probabilities, and the backward
            recomputes each block's probabilities. Memory O(T) instead of O(T^2); results equal to rounding.
    """

    num_heads: int
    head_dim: int | None = None
    causal: bool = False
    out_dim: int | None = None
    use_bias: bool = True
    block_size: int | None = None

    def __post_init__(self):
        for name in ("num_heads", "head_dim", "out_dim", "block_size"):
            value = getattr(self, name)
            if value is not None or name == "num_heads":
                positive_int(value, name, "MultiHeadSelfAttention")

    def __repr__(self) -> str:
        options = "" if self.head_dim is None else f", head_dim={self.head_dim}"
        options += ", causal=True" if self.causal else ""
        options += "" if self.block_size is None else f", block_size={self.block_size}"
        return f"MultiHeadSelfAttention({self.num_heads}{options})"

    def _parts(self, model_dim: int) -> Serial:
        """The layer as a composition: ``[x Wq | x Wk | x Wv] -> core -> Wo``."""
        head_dim = self.head_dim or model_dim // self.num_heads
        inner = self.num_heads * head_dim
        projections = Parallel(tuple(Dense(inner, use_bias=self.use_bias) for _ in "qkv"))
        if self.block_size is None:
            core = AttentionCore(self.num_heads, head_dim, self.causal)
        else:
            from mnet.layers.blockwise_attention import BlockwiseAttentionCore  # it builds on AttentionCore

            core = BlockwiseAttentionCore(self.num_heads, head_dim, self.causal, self.block_size)
        return Serial(
            (
                projections,
                core,
                Dense(self.out_dim or model_dim, use_bias=self.use_bias),
            )
        )

    def network(self, cache: Cache) -> Serial:
        return self._parts(cache[0][0][0].shape[-1])  # the projections' caches are x itself

    def to_network(self, params: Params) -> Params:
        return ((params["q"], params["k"], params["v"]), (), params["o"])

    def from_network(self, tree):
        (q, k, v), _, o = tree
        return {"q": q, "k": k, "v": v, "o": o}

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        shape = self._check_input_shape(input_shape)
        if len(shape) != 2:
            raise self._fail(f"expects examples of shape (T, D) (a sequence of D-vectors), got {shape}")
        if self.head_dim is None and shape[1] % self.num_heads:
            raise self._fail(
                f"model width D = {shape[1]} (input {shape}) does not divide into {self.num_heads} heads; "
                "give head_dim explicitly or change num_heads"
            )
        try:
            out_shape, params = self._parts(shape[1]).init(key, shape, dtype)
        except LayerError as error:
            raise LayerError(self, error.detail) from None
        return out_shape, self.from_network(params)

    def _check(self, params: Params, x: Array) -> Serial:
        self._check_input(x, min_rank=3)
        if x.ndim != 3:
            raise self._fail(f"expects input of shape (batch, T, D), got {tuple(x.shape)}")
        check_param_keys(self, params, {"q", "k", "v", "o"})
        if self.head_dim is None and x.shape[2] % self.num_heads:
            raise self._fail(f"model width D = {x.shape[2]} does not divide into {self.num_heads} heads")
        return self._parts(x.shape[2])

    def forward(self, params: Params, x: Array, mask: Array | None = None) -> tuple[Array, Cache]:
        projections, core, output = self._check(params, x).layers
        if mask is not None:
            full = (x.shape[0], core.num_heads, x.shape[1], x.shape[1])
            try:
                fits = jnp.broadcast_shapes(jnp.shape(mask), full) == full
            except ValueError:
                fits = False
            if not fits or jnp.asarray(mask).dtype != bool:
                raise self._fail(
                    f"expects a boolean mask broadcastable to (batch, heads, T, T) = {full}, "
                    f"got {jnp.asarray(mask).dtype} of shape {jnp.shape(mask)}"
                )
        try:
            qkv, projections_cache = projections.forward(self.to_network(params)[0], x)
            heads, core_cache = core.forward((), qkv, mask)
            y, output_cache = output.forward(params["o"], heads)
        except LayerError as error:
            raise LayerError(self, error.detail) from None
        return y, (projections_cache, core_cache, output_cache)
