"""mnet: neural networks as pure functions over parameter pytrees, forward in explicit matrix algebra, backward
derived by hand beside it and checked against ``jax.grad``."""

from mnet import activations, errors, initializers, losses
from mnet.backprop import grad, value_and_grad, with_manual_backward
from mnet.check import GradientReport, autodiff_value_and_grad, compare_cost, compare_gradients
from mnet.combinators import Serial, mlp, serial
from mnet.errors import CheckpointError, DataError, DivergenceError, LayerError, LossError, MnetError
from mnet.layers import (
    Dense,
    Elementwise,
    Elu,
    Flatten,
    Gelu,
    Identity,
    Layer,
    LeakyRelu,
    Relu,
    Sigmoid,
    Softmax,
    Softplus,
    Tanh,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "DataError",
    "Dense",
    "DivergenceError",
    "Elementwise",
    "Elu",
    "Flatten",
    "GradientReport",
    "Gelu",
    "Identity",
    "Layer",
    "LayerError",
    "LeakyRelu",
    "LossError",
    "MnetError",
    "Relu",
    "Serial",
    "Sigmoid",
    "Softmax",
    "Softplus",
    "Tanh",
    "activations",
    "autodiff_value_and_grad",
    "compare_cost",
    "compare_gradients",
    "errors",
    "grad",
    "initializers",
    "losses",
    "mlp",
    "serial",
    "value_and_grad",
    "with_manual_backward",
]
