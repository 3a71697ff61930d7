"""Ready-made networks built from mnet's layers, used by the experiments, the benchmarks and the tests."""

from __future__ import annotations

from mnet.attention import MultiHeadSelfAttention
from mnet.combinators import Serial, residual, serial
from mnet.convolution import Conv2D
from mnet.embedding import Embedding
from mnet.layers import Dense, Flatten, Gelu, LayerNorm, Relu, Reshape
from mnet.pooling import MaxPool2D


def digits_cnn(classes: int = 10) -> Serial:
    """A small CNN for 8x8 grey images given as 64 flat features (the bundled digits)::

        Reshape(8, 8, 1) -> Conv2D(16, 3, SAME) -> Relu -> MaxPool2D(2)
                         -> Conv2D(32, 3, SAME) -> Relu -> MaxPool2D(2) -> Flatten -> Dense(64) -> Relu -> Dense(classes)
    """
    return serial(Reshape((8, 8, 1)), Conv2D(16, 3, padding="SAME"), Relu(), MaxPool2D(2),
                  Conv2D(32, 3, padding="SAME"), Relu(), MaxPool2D(2), Flatten(),
                  Dense(64), Relu(), Dense(classes))


def transformer_block(width: int, heads: int, hidden: int | None = None, causal: bool = False) -> Serial:
    """A pre-norm transformer block: ``x + attention(LayerNorm(x))``, then ``x + MLP(LayerNorm(x))`` with a GELU
    MLP of ``hidden`` units (default ``2 * width``)."""
    return serial(
        residual(serial(LayerNorm(), MultiHeadSelfAttention(heads, causal=causal))),
        residual(serial(LayerNorm(), Dense(hidden or 2 * width), Gelu(), Dense(width))),
    )


def transformer_classifier(vocab: int, classes: int, width: int = 32, heads: int = 4, blocks: int = 1) -> Serial:
    """Token ids ``(batch, T)`` to class logits: ``Embedding(vocab, width)``, ``blocks`` transformer blocks, a final
    LayerNorm, then every position's features flattened into one linear read-out."""
    return serial(Embedding(vocab, width), *[transformer_block(width, heads) for _ in range(blocks)],
                  LayerNorm(), Flatten(), Dense(classes))
