"""Ready-made networks built from mnet's layers, used by the experiments, the benchmarks and the tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mnet.core.protocol import is_layer
from mnet.errors import KindError, SettingError
from mnet.layers import (
    ACTIVATIONS_BY_NAME,
    BatchNorm,
    Conv2D,
    Dense,
    Embedding,
    Flatten,
    GatedMLP,
    Gelu,
    LayerNorm,
    MaxPool2D,
    MultiHeadSelfAttention,
    Policy,
    Relu,
    Reshape,
    RMSNorm,
    Serial,
    Tied,
    residual,
    serial,
)


def mlp(widths: Sequence[int], activation: str | Any = "relu", compute_dtype: str | None = None) -> Serial:
    """A multilayer perceptron: ``Dense(w)`` then ``activation`` for every width but the last, which is linear.

    ``mlp([128, 64, 10])`` is ``serial(Dense(128), Relu(), Dense(64), Relu(), Dense(10))``.

    Arguments:
        widths: output widths of the dense layers, the last being the network's output width.
        activation: a layer instance or a name from ``mnet.layers.ACTIVATIONS_BY_NAME``.
        compute_dtype: mixed precision (``"bfloat16"``/``"float16"``): every dense layer computes in it with
            float32 accumulation, and the last one returns float32 so the loss is computed exactly.
    """
    if isinstance(activation, str):
        try:
            activation = ACTIVATIONS_BY_NAME[activation]()
        except KeyError:
            known = ", ".join(sorted(ACTIVATIONS_BY_NAME))
            raise SettingError(f"unknown activation {activation!r}; known: {known}") from None
    elif not is_layer(activation):
        raise KindError(f"mlp: activation must be a name or a layer, got {activation!r}")
    if not widths:
        raise SettingError("mlp needs at least one width (the output width)")
    hidden = None if compute_dtype is None else Policy(compute_dtype)
    last = None if compute_dtype is None else Policy(compute_dtype, output_dtype="float32")
    layers: list[Any] = []
    for width in widths[:-1]:
        layers += [Dense(width, policy=hidden), activation]
    return serial(*layers, Dense(widths[-1], policy=last))


def digits_cnn(classes: int = 10, batch_norm: bool = False) -> Serial:
    """A small CNN for 8x8 grey images given as 64 flat features (the bundled digits)::

    Reshape(8, 8, 1) -> Conv2D(16, 3, SAME) -> Relu -> MaxPool2D(2)
                     -> Conv2D(32, 3, SAME) -> Relu -> MaxPool2D(2) -> Flatten -> Dense(64) -> Relu -> Dense(classes)

    ``batch_norm=True`` puts a :class:`BatchNorm` after each convolution and the hidden dense layer (before the
    ReLU); the network then keeps state (see :func:`mnet.init_state`).
    """
    norm = (BatchNorm(),) if batch_norm else ()
    return serial(
        Reshape((8, 8, 1)),
        Conv2D(16, 3, padding="SAME"),
        *norm,
        Relu(),
        MaxPool2D(2),
        Conv2D(32, 3, padding="SAME"),
        *norm,
        Relu(),
        MaxPool2D(2),
        Flatten(),
        Dense(64),
        *norm,
        Relu(),
        Dense(classes),
    )


def transformer_block(
    width: int, heads: int, hidden: int | None = None, causal: bool = False, block_size: int | None = None
) -> Serial:
    """A pre-norm transformer block: ``x + attention(LayerNorm(x))``, then ``x + MLP(LayerNorm(x))`` with a GELU
    MLP of ``hidden`` units (default ``2 * width``); ``block_size``: blockwise attention (O(T) memory)."""
    return serial(
        residual(serial(LayerNorm(), MultiHeadSelfAttention(heads, causal=causal, block_size=block_size))),
        residual(serial(LayerNorm(), Dense(hidden or 2 * width), Gelu(), Dense(width))),
    )


def transformer_classifier(
    vocab: int, classes: int, width: int = 32, heads: int = 4, blocks: int = 1, block_size: int | None = None
) -> Serial:
    """Token ids ``(batch, T)`` to class logits: ``Embedding(vocab, width)``, ``blocks`` transformer blocks, a final
    LayerNorm, then every position's features flattened into one linear read-out."""
    return serial(
        Embedding(vocab, width),
        *[transformer_block(width, heads, block_size=block_size) for _ in range(blocks)],
        LayerNorm(),
        Flatten(),
        Dense(classes),
    )


def gpt(
    vocab: int,
    context: int,
    d_model: int,
    num_layers: int,
    num_heads: int,
    *,
    num_kv_heads: int | None = None,
    hidden: int | None = None,
    activation: str = "silu",
    rope_base: float = 10000.0,
    block_size: int | None = None,
    eps: float = 1e-6,
    tie_embeddings: bool = False,
) -> Serial:
    """A LLaMA-style pre-norm causal decoder: token ids ``(batch, T)`` (``T <= context``) to next-token logits
    ``(batch, T, vocab)`` at every position::

        Embedding(vocab, d_model)
        num_layers x [ x + attention(RMSNorm(x)),  x + GatedMLP(RMSNorm(x)) ]      causal, rotary positions
        RMSNorm -> Dense(vocab, no bias)

    Train it with :func:`mnet.losses.softmax_cross_entropy` on the ids shifted by one (targets ``(batch, T)``).

    Arguments:
        vocab: number of token ids.
        context: the longest sequence accepted (the embedding refuses longer ones).
        d_model: model width; ``num_heads`` must divide it (head width ``d_model / num_heads``, even).
        num_layers: decoder blocks.
        num_heads: query heads.
        num_kv_heads: key-value heads (grouped-query attention; default ``num_heads``).
        hidden: the gated MLP's width (default LLaMA's ``8/3 d_model`` rounded up to a multiple of 8).
        activation: ``"silu"`` (SwiGLU) or ``"gelu"`` (GeGLU).
        rope_base: the rotary base.
        block_size: blockwise attention in blocks of this many positions (O(T) memory).
        eps: the RMSNorms' epsilon.
        tie_embeddings: the read-out reuses the embedding's table, ``logits = h E^T`` (:class:`mnet.layers.tied.Tied`;
            params ``{"embedding": {"W": E}, "body": ...}``; what each quantity does with the shared table is in
            :mod:`mnet.layers.tied`).
    """
    if d_model % num_heads:
        raise SettingError(f"gpt: num_heads = {num_heads} does not divide d_model = {d_model}")
    width = hidden or -(-8 * d_model // 3 // 8) * 8
    attention = MultiHeadSelfAttention(
        num_heads,
        causal=True,
        use_bias=False,
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        rope_base=rope_base,
    )
    block = [
        residual(serial(RMSNorm(eps), attention)),
        residual(serial(RMSNorm(eps), GatedMLP(width, activation=activation))),
    ]
    embedding = Embedding(vocab, d_model, max_length=context)
    blocks = [layer for _ in range(num_layers) for layer in block]
    if tie_embeddings:
        return serial(Tied(embedding, serial(*blocks, RMSNorm(eps))))
    return serial(embedding, *blocks, RMSNorm(eps), Dense(vocab, use_bias=False))
