"""Training: ``fit`` (any network, loss and optax optimizer, hand-derived or autodiff gradients), its steps and
epochs, where arrays live on a mesh, several processes, data, checkpoints and plots."""

from mnet.training.fit import FitResult, History, check_targets, epoch_key, fit, make_evaluate
from mnet.training.layout import Layout, data_parallel_mesh, epoch_order, layout_memory, make_epoch, step_keys
from mnet.training.plots import plot_history
from mnet.training.steps import (
    GRADIENT_MODES,
    gradient_function,
    make_stateful_step,
    make_step,
    stateful_gradient_function,
)

__all__ = [
    "GRADIENT_MODES",
    "FitResult",
    "History",
    "Layout",
    "check_targets",
    "data_parallel_mesh",
    "epoch_key",
    "epoch_order",
    "fit",
    "gradient_function",
    "layout_memory",
    "make_epoch",
    "make_evaluate",
    "make_stateful_step",
    "make_step",
    "plot_history",
    "stateful_gradient_function",
    "step_keys",
]
