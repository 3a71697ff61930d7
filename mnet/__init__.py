"""mnet: neural networks as pure functions over parameter pytrees, forward in explicit matrix algebra, backward
derived by hand beside it and checked against ``jax.grad``."""

from mnet import activations, data, errors, initializers, losses, models, train
from mnet.train import fit
from mnet.backprop import grad, value_and_grad, with_manual_backward
from mnet.checkpoint import load_params, save_params
from mnet.check import GradientReport, autodiff_value_and_grad, compare_cost, compare_gradients
from mnet.attention import MultiHeadSelfAttention
from mnet.convolution import Conv2D
from mnet.embedding import Embedding
from mnet.pooling import AvgPool2D, MaxPool2D
from mnet.combinators import Parallel, Residual, Serial, mlp, parallel, residual, serial
from mnet.derivatives import (
    clipped_value_and_grad,
    dp_noise,
    jacobian,
    ntk,
    per_example_grad_norms,
    per_example_grads,
)
from mnet.errors import CheckpointError, DataError, DivergenceError, LayerError, LossError, MnetError
from mnet.layers import (
    Dense,
    Dropout,
    Elementwise,
    Elu,
    Flatten,
    Gelu,
    Identity,
    Layer,
    LayerNorm,
    LeakyRelu,
    Policy,
    Relu,
    Reshape,
    Sigmoid,
    Softmax,
    Softplus,
    Tanh,
)

__version__ = "0.1.0"

__all__ = [
    "AvgPool2D",
    "CheckpointError",
    "Conv2D",
    "DataError",
    "Dense",
    "DivergenceError",
    "Dropout",
    "Elementwise",
    "Elu",
    "Embedding",
    "Flatten",
    "Gelu",
    "GradientReport",
    "Identity",
    "Layer",
    "LayerError",
    "LayerNorm",
    "LeakyRelu",
    "LossError",
    "MaxPool2D",
    "MnetError",
    "MultiHeadSelfAttention",
    "Parallel",
    "Policy",
    "Relu",
    "Reshape",
    "Residual",
    "Serial",
    "Sigmoid",
    "Softmax",
    "Softplus",
    "Tanh",
    "activations",
    "autodiff_value_and_grad",
    "clipped_value_and_grad",
    "compare_cost",
    "compare_gradients",
    "data",
    "dp_noise",
    "errors",
    "fit",
    "grad",
    "initializers",
    "jacobian",
    "load_params",
    "losses",
    "models",
    "mlp",
    "ntk",
    "parallel",
    "per_example_grad_norms",
    "per_example_grads",
    "residual",
    "save_params",
    "serial",
    "train",
    "value_and_grad",
    "with_manual_backward",
]
