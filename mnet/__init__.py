"""mnet: neural networks as pure functions over parameter pytrees, forward in explicit matrix algebra, backward
derived by hand beside it and checked against ``jax.grad``.

This module only re-exports: the public surface of ``API.md``, one explicit list. The rooms behind it are
``mnet.core`` (what a layer is, the walks), ``mnet.layers``, ``mnet.quantities`` (one module per derivative
quantity), ``mnet.optim``, ``mnet.laplace``, ``mnet.checking`` (the autodiff referee), ``mnet.training``,
``mnet.bench`` and ``mnet.cli``.
"""

from mnet import activations, errors, initializers, interop, layers, losses, models, spectrum, training
from mnet.checking import reference
from mnet.checking.cost import compare_cost
from mnet.checking.gradient_report import GradientReport
from mnet.checking.gradients import compare_gradients
from mnet.checking.layer_check import LayerReport, check_layer
from mnet.checking.network_check import check_network
from mnet.checking.reference import autodiff_value_and_grad
from mnet.checking.tangents import compare_jvp
from mnet.core.layer import Layer
from mnet.core.protocol import LayerProtocol
from mnet.core.state import init_state, update_state
from mnet.errors import (
    CheckpointError,
    DataError,
    DivergenceError,
    KindError,
    LayerError,
    LossError,
    MnetError,
    SearchEdgeWarning,
    SettingError,
)
from mnet.influence import Influence, influence
from mnet.laplace import Laplace, laplace
from mnet.layers import (
    GRU,
    LSTM,
    RNN,
    AvgPool2D,
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Elementwise,
    Elu,
    Embedding,
    Flatten,
    GatedMLP,
    GatedProduct,
    Gelu,
    Identity,
    LastStep,
    LayerNorm,
    LeakyRelu,
    MaxPool2D,
    MultiHeadSelfAttention,
    Parallel,
    Policy,
    Relu,
    Reshape,
    Residual,
    RMSNorm,
    Serial,
    Sigmoid,
    Silu,
    Softmax,
    Softplus,
    Tanh,
    Tied,
    Transpose,
    Unembed,
    parallel,
    residual,
    serial,
)
from mnet.models import mlp
from mnet.optim.accounting import dp_epsilon, poisson_capacity
from mnet.optim.dp import clipped_value_and_grad, dp_noise
from mnet.optim.kfac import KFACState, kfac, kfac_preconditioner
from mnet.quantities.diag_hessian import diag_hessian, per_example_diag_hessian
from mnet.quantities.ekfac import eigen_correction, ekfac_factors
from mnet.quantities.ggn import diag_ggn, ggn_vector_product, per_example_diag_ggn
from mnet.quantities.gradient import grad, value_and_grad, value_grad_and_state, with_manual_backward
from mnet.quantities.gradient_moments import gradient_variance, sum_grad_squared
from mnet.quantities.hessian_vector import hessian_vector_product
from mnet.quantities.jacobian import jacobian
from mnet.quantities.kfac_direction import kfac_direction
from mnet.quantities.kronecker import kfac_factors
from mnet.quantities.ntk import ntk
from mnet.quantities.one_pass import one_pass
from mnet.quantities.per_example import per_example_grad_norms, per_example_grads
from mnet.quantities.tangent import jvp, with_manual_tangent
from mnet.training import checkpoint, data, distributed, launch, sharding
from mnet.training.checkpoint import load_params, save_params
from mnet.training.fit import fit

# The modules that held these names before the package had rooms; kept so that ``mnet.train.fit`` and the like work.
train = training

__version__ = "0.1.0"

__all__ = [
    "AvgPool2D",
    "BatchNorm",
    "CheckpointError",
    "Conv2D",
    "DataError",
    "Dense",
    "DivergenceError",
    "KindError",
    "SettingError",
    "SearchEdgeWarning",
    "Dropout",
    "Elementwise",
    "Elu",
    "Embedding",
    "Flatten",
    "GRU",
    "GatedMLP",
    "GatedProduct",
    "Gelu",
    "GradientReport",
    "Identity",
    "KFACState",
    "LSTM",
    "Laplace",
    "LastStep",
    "Layer",
    "LayerError",
    "LayerNorm",
    "LayerProtocol",
    "LayerReport",
    "LeakyRelu",
    "LossError",
    "MaxPool2D",
    "MnetError",
    "MultiHeadSelfAttention",
    "Parallel",
    "Policy",
    "RNN",
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
    "activations",
    "autodiff_value_and_grad",
    "checkpoint",
    "check_layer",
    "check_network",
    "clipped_value_and_grad",
    "compare_cost",
    "compare_gradients",
    "compare_jvp",
    "data",
    "diag_ggn",
    "diag_hessian",
    "distributed",
    "dp_noise",
    "dp_epsilon",
    "poisson_capacity",
    "errors",
    "fit",
    "ggn_vector_product",
    "grad",
    "gradient_variance",
    "hessian_vector_product",
    "init_state",
    "initializers",
    "jacobian",
    "jvp",
    "kfac",
    "kfac_factors",
    "kfac_direction",
    "ekfac_factors",
    "eigen_correction",
    "Influence",
    "influence",
    "spectrum",
    "kfac_preconditioner",
    "laplace",
    "launch",
    "layers",
    "load_params",
    "losses",
    "mlp",
    "models",
    "interop",
    "ntk",
    "sum_grad_squared",
    "parallel",
    "one_pass",
    "per_example_diag_ggn",
    "per_example_diag_hessian",
    "per_example_grad_norms",
    "per_example_grads",
    "reference",
    "residual",
    "save_params",
    "serial",
    "sharding",
    "train",
    "training",
    "update_state",
    "value_and_grad",
    "value_grad_and_state",
    "with_manual_backward",
    "with_manual_tangent",
]
