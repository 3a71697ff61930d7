"""mnet's concrete layers, one concept (or one family) per module, each with all of its rules beside its forward;
what a layer is and how every quantity walks through a network is :mod:`mnet.core` (see ``docs/ARCHITECTURE.md``)."""

from mnet.layers.attention import AttentionCore, BlockwiseAttentionCore, HeadLayout, MultiHeadSelfAttention
from mnet.layers.combinators import Parallel, Residual, Serial, parallel, residual, serial
from mnet.layers.convolution import Conv2D
from mnet.layers.dense import Dense, Policy
from mnet.layers.dropout import Dropout
from mnet.layers.elementwise import (
    ACTIVATIONS_BY_NAME,
    Elementwise,
    Elu,
    Gelu,
    Identity,
    LeakyRelu,
    Relu,
    Sigmoid,
    Silu,
    Softmax,
    Softplus,
    Tanh,
)
from mnet.layers.embedding import Embedding
from mnet.layers.gated import GatedMLP, GatedProduct
from mnet.layers.normalization import BatchNorm, LayerNorm, RMSNorm
from mnet.layers.pooling import AvgPool2D, MaxPool2D
from mnet.layers.recurrent import GRU, LSTM, RNN, LastStep, Recurrent
from mnet.layers.shape import Flatten, Reshape, Transpose
from mnet.layers.tied import Tied, Unembed
from mnet.layers.windows import Windows

__all__ = [
    "BatchNorm",
    "GRU",
    "LSTM",
    "LastStep",
    "RNN",
    "Recurrent",
    "ACTIVATIONS_BY_NAME",
    "AttentionCore",
    "AvgPool2D",
    "BlockwiseAttentionCore",
    "Conv2D",
    "Dense",
    "Dropout",
    "Elementwise",
    "Elu",
    "Embedding",
    "Flatten",
    "GatedMLP",
    "GatedProduct",
    "Gelu",
    "HeadLayout",
    "Identity",
    "LayerNorm",
    "LeakyRelu",
    "MaxPool2D",
    "MultiHeadSelfAttention",
    "Parallel",
    "Policy",
    "Relu",
    "Reshape",
    "Transpose",
    "RMSNorm",
    "Residual",
    "Serial",
    "Sigmoid",
    "Silu",
    "Softmax",
    "Softplus",
    "Tanh",
    "Tied",
    "Unembed",
    "Windows",
    "parallel",
    "residual",
    "serial",
]
