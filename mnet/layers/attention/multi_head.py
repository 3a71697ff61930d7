"""Multi-head self-attention in matrix algebra: three dense projections, the attention core with its softmax
backward written out, and an output projection; every derivative walks through the four parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from mnet.core.layer import check_param_keys, positive_int
from mnet.core.protocol import Array, Cache, Params, Shape, call_forward
from mnet.core.walk import Compound
from mnet.errors import LayerError, SettingError
from mnet.layers.attention.blockwise import BlockwiseAttentionCore
from mnet.layers.attention.core import AttentionCore
from mnet.layers.attention.heads import HeadLayout
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

    ``forward(params, x, mask=None)``: ``mask`` is a padding mask ``(batch, T)``, True at the positions that hold a
    token (no query attends to a padded key), or any boolean array of rank 4 broadcastable to
    ``(batch, heads, T, T)``, True where query ``s`` may attend to key ``t``; ``causal=True`` also masks every key
    after the query. A padding mask given to a network's quantities (``mnet.value_and_grad(...)(..., mask=m)``)
    reaches every attention layer inside ``serial``, ``residual`` and ``parallel``.

    Grouped-query attention (``num_kv_heads=g``) and rotary positions (``rope_base=b``) add a fixed linear map
    between the projections and the core (:class:`mnet.layers.attention.heads.HeadLayout`): ``Wk`` and ``Wv`` then
    project to ``g * head_dim``, every key-value head serves ``num_heads / g`` consecutive query heads, and each
    head's queries and keys turn by the angles ``t * b^(-2i/head_dim)`` (rotate-half, as Hugging Face's LLaMA).

    Arguments:
        num_heads: number of heads.
        head_dim: width of each head (default: ``D // num_heads``, and then ``num_heads`` must divide ``D``).
        causal: mask the future (for autoregressive models).
        out_dim: output width (default ``D``, so that the layer fits in a residual block).
        use_bias: biases in the four projections (default True).
        num_kv_heads: key-value heads (default ``num_heads``; 1 for multi-query attention); must divide
            ``num_heads``.
        rope_base: rotary position embedding with this base (LLaMA: 10000.0); ``head_dim`` must then be even.
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
    num_kv_heads: int | None = None
    rope_base: float | None = None
    takes_mask = True

    def __post_init__(self):
        for name in ("num_heads", "head_dim", "out_dim", "block_size", "num_kv_heads"):
            value = getattr(self, name)
            if value is not None or name == "num_heads":
                positive_int(value, name, "MultiHeadSelfAttention")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise SettingError(
                f"MultiHeadSelfAttention: num_kv_heads = {self.num_kv_heads} does not divide num_heads = "
                f"{self.num_heads} (each key-value head serves num_heads / num_kv_heads query heads)"
            )
        if self.rope_base is not None:
            if isinstance(self.rope_base, bool) or not isinstance(self.rope_base, int | float) or self.rope_base <= 1:
                raise SettingError(f"MultiHeadSelfAttention: rope_base must be a number > 1, got {self.rope_base!r}")
            if self.head_dim is not None and self.head_dim % 2:
                raise SettingError(
                    f"MultiHeadSelfAttention: rotary positions pair the features of a head, so head_dim must be "
                    f"even, got {self.head_dim}"
                )

    def __repr__(self) -> str:
        options = "" if self.head_dim is None else f", head_dim={self.head_dim}"
        options += ", causal=True" if self.causal else ""
        options += "" if self.block_size is None else f", block_size={self.block_size}"
        options += "" if self.num_kv_heads is None else f", num_kv_heads={self.num_kv_heads}"
        options += "" if self.rope_base is None else f", rope_base={self.rope_base}"
        return f"MultiHeadSelfAttention({self.num_heads}{options})"

    def _parts(self, model_dim: int) -> Serial:
        """The layer as a composition: ``[x Wq | x Wk | x Wv] -> core -> Wo``."""
        head_dim = self.head_dim or model_dim // self.num_heads
        kv_heads = self.num_kv_heads or self.num_heads
        widths = (self.num_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
        projections = Parallel(tuple(Dense(width, use_bias=self.use_bias) for width in widths))
        if self.block_size is None:
            core = AttentionCore(self.num_heads, head_dim, self.causal)
        else:
            core = BlockwiseAttentionCore(self.num_heads, head_dim, self.causal, self.block_size)
        layout = (
            ()
            if kv_heads == self.num_heads and self.rope_base is None
            else (HeadLayout(self.num_heads, kv_heads, head_dim, self.rope_base),)
        )
        return Serial((projections, *layout, core, Dense(self.out_dim or model_dim, use_bias=self.use_bias)))

    def network(self, cache: Cache) -> Serial:
        return self._parts(cache[0][0][0].shape[-1])  # the projections' caches are x itself

    @property
    def _has_layout(self) -> bool:
        return not (self.num_kv_heads in (None, self.num_heads) and self.rope_base is None)

    def to_network(self, params: Params) -> Params:
        return ((params["q"], params["k"], params["v"]), *((),) * (1 + self._has_layout), params["o"])

    def from_network(self, tree):
        (q, k, v), *_, o = tree
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
        self._check_rotary(shape[1])
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
        self._check_rotary(x.shape[2])
        return self._parts(x.shape[2])

    def _check_rotary(self, model_dim: int) -> None:
        head_dim = self.head_dim or model_dim // self.num_heads
        if self.rope_base is not None and head_dim % 2:
            raise self._fail(
                f"rotary positions pair the features of a head, so head_dim must be even, got head_dim = "
                f"{head_dim} (model width {model_dim} over {self.num_heads} heads)"
            )

    def _attention_mask(self, mask: Array | None, shape: tuple, heads: int) -> Array | None:
        """A padding mask ``(batch, T)`` as the key mask ``(batch, 1, 1, T)``; a rank-4 mask as it is."""
        if mask is None:
            return None
        mask = jnp.asarray(mask)
        padding = (shape[0], shape[1])
        full = (shape[0], heads, shape[1], shape[1])
        if mask.ndim == 2 and mask.shape == padding and mask.dtype == bool:
            return mask[:, None, None, :]
        try:
            fits = mask.ndim == 4 and jnp.broadcast_shapes(mask.shape, full) == full
        except ValueError:
            fits = False
        if not fits or mask.dtype != bool:
            raise self._fail(
                f"expects a boolean padding mask (batch, T) = {padding} or a mask broadcastable to "
                f"(batch, heads, T, T) = {full}, got {mask.dtype} of shape {tuple(mask.shape)}"
            )
        return mask

    def forward(self, params: Params, x: Array, mask: Array | None = None) -> tuple[Array, Cache]:
        projections, *layout, core, output = self._check(params, x).layers
        mask = self._attention_mask(mask, x.shape, core.num_heads)
        try:
            qkv, projections_cache = call_forward(projections, self.to_network(params)[0], x)
            layout_caches = []
            for part in layout:
                qkv, part_cache = call_forward(part, (), qkv)
                layout_caches.append(part_cache)
            heads, core_cache = call_forward(core, (), qkv, mask=mask)
            y, output_cache = call_forward(output, params["o"], heads)
        except LayerError as error:
            raise LayerError(self, error.detail) from None
        return y, (projections_cache, *layout_caches, core_cache, output_cache)
