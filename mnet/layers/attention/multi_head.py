"""Multi-head self-attention in matrix algebra: three dense projections, the attention core with its softmax
backward written out, and an output projection; every derivative walks through the four parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from mnet.core.layer import check_param_keys, positive_int
from mnet.core.protocol import Array, Cache, Params, Shape, call_forward
from mnet.core.walk import Compound
from mnet.errors import LayerError
from mnet.layers.attention.blockwise import BlockwiseAttentionCore
from mnet.layers.attention.core import AttentionCore
from mnet.layers.combinators import Parallel, Serial
from mnet.layers.dense import Dense


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
            (:class:`mnet.layers.attention.blockwise.BlockwiseAttentionCore`): the cache then holds ``Q, K, V``, the
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
            qkv, projections_cache = call_forward(projections, self.to_network(params)[0], x)
            heads, core_cache = call_forward(core, (), qkv, mask=mask)
            y, output_cache = call_forward(output, params["o"], heads)
        except LayerError as error:
            raise LayerError(self, error.detail) from None
        return y, (projections_cache, core_cache, output_cache)
