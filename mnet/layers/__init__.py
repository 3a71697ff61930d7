"""mnet's layers, one concept per module; :mod:`mnet.layers.base` says what a layer is and how every quantity
walks through a network (see ``docs/ARCHITECTURE.md``)."""

from mnet.layers.attention import AttentionCore, MultiHeadSelfAttention
from mnet.layers.base import (
    Array,
    Cache,
    Composite,
    Compound,
    Layer,
    LayerProtocol,
    MissingRule,
    Params,
    Quantity,
    Shape,
    apply_layer,
    batch_sq_norms,
    call_forward,
    default_float_dtype,
    init_layer,
    is_layer,
    positive_int,
    shape_record,
    walk,
)
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
    Softmax,
    Softplus,
    Tanh,
)
from mnet.layers.embedding import Embedding
from mnet.layers.normalization import BatchNorm, LayerNorm
from mnet.layers.pooling import AvgPool2D, MaxPool2D
from mnet.layers.recurrent import GRU, LSTM, RNN, LastStep, Recurrent
from mnet.layers.shape import Flatten, Reshape
from mnet.layers.windows import Windows

__all__ = [
    "BatchNorm",
    "GRU",
    "LSTM",
    "LastStep",
    "RNN",
    "Recurrent",
    "ACTIVATIONS_BY_NAME",
    "Array",
    "AttentionCore",
    "AvgPool2D",
    "Cache",
    "Composite",
    "Compound",
    "Conv2D",
    "Dense",
    "Dropout",
    "Elementwise",
    "Elu",
    "Embedding",
    "Flatten",
    "Gelu",
    "Identity",
    "Layer",
    "LayerNorm",
    "LayerProtocol",
    "LeakyRelu",
    "MaxPool2D",
    "MissingRule",
    "MultiHeadSelfAttention",
    "Params",
    "Parallel",
    "Policy",
    "Quantity",
    "Relu",
    "Reshape",
    "Residual",
    "Serial",
    "Shape",
    "Sigmoid",
    "Softmax",
    "Softplus",
    "Tanh",
    "Windows",
    "apply_layer",
    "batch_sq_norms",
    "call_forward",
    "default_float_dtype",
    "init_layer",
    "is_layer",
    "parallel",
    "positive_int",
    "residual",
    "serial",
    "shape_record",
    "walk",
]
