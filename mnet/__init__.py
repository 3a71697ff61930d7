"""mnet: neural networks as pure functions over parameter pytrees, forward in explicit matrix algebra, backward
derived by hand beside it and checked against ``jax.grad``."""

from mnet import activations, data, errors, initializers, losses, train
from mnet.train import fit
from mnet.backprop import grad, value_and_grad, with_manual_backward
from mnet.checkpoint import load_params, save_params
from mnet.check import GradientReport, autodiff_value_and_grad, compare_cost, compare_gradients
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
    "Dropout",
    "DivergenceError",
    "Elementwise",
    "Elu",
    "Flatten",
    "GradientReport",
    "Gelu",
    "Identity",
    "Layer",
    "LayerError",
    "LayerNorm",
    "LeakyRelu",
    "LossError",
    "MnetError",
    "Parallel",
    "Policy",
    "Relu",
    "Residual",
    "Serial",
    "Sigmoid",
    "Softmax",
    "Softplus",
    "Tanh",
    "activations",
    "autodiff_value_and_grad",
    "clipped_value_and_grad",
    "dp_noise",
    "compare_cost",
    "compare_gradients",
    "data",
    "errors",
    "fit",
    "grad",
    "initializers",
    "jacobian",
    "load_params",
    "losses",
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
