"""One training step: a gradient function (hand-derived, autodiff or the user's) and an optax optimizer, jitted as a
pure function of the parameters, the optimizer state and a batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from mnet import losses
from mnet.checking.reference import autodiff_value_and_grad, autodiff_value_grad_and_state
from mnet.core.protocol import LayerProtocol as Layer
from mnet.errors import SettingError
from mnet.quantities.gradient import value_and_grad, value_grad_and_state

GRADIENT_MODES = ("manual", "autodiff")


def gradient_function(net: Layer, loss: losses.Loss, grad: str | Callable):
    """``value_and_grad`` by hand (``"manual"``), the autodiff reference (``"autodiff"``), or any function with
    their signature ``(params, x, targets) -> (value, grads)`` (e.g. :func:`mnet.clipped_value_and_grad`)."""
    if callable(grad):
        return grad
    if grad == "manual":
        return value_and_grad(net, loss)
    if grad == "autodiff":
        return autodiff_value_and_grad(net, loss)
    raise SettingError(f"grad must be one of {GRADIENT_MODES}, got {grad!r}")


def stateful_gradient_function(net: Layer, loss: losses.Loss, grad: str | Callable):
    """For a network that keeps state: ``value_grad_and_state`` by hand or its autodiff reference; a function of
    its own is refused (it could not return the new running statistics)."""
    if grad == "manual":
        return value_grad_and_state(net, loss)
    if grad == "autodiff":
        return autodiff_value_grad_and_state(net, loss)
    raise SettingError(
        f"{net!r} keeps state (BatchNorm), so fit needs grad='manual' or 'autodiff' to update the running statistics, "
        f"got {grad!r}"
    )


def make_step(
    value_and_grad_fn: Callable, optimizer: optax.GradientTransformation, batch_gradient: bool = False
) -> Callable:
    """One optimizer step ``(params, opt_state, x, y, optimizer_key=None, **kwargs) -> (params, opt_state, loss
    value)``; keyword arguments (a dropout key, ``train=True``) go to the gradient function. An optimizer that takes
    extra arguments (``optax.GradientTransformationExtraArgs``, such as :func:`mnet.kfac`) also gets the batch,
    ``inputs=x, targets=y``, its padding ``mask=`` if it has one, and ``key=optimizer_key``; optax's own
    transformations ignore them.

    ``batch_gradient=True`` says that ``value_and_grad_fn`` is the gradient of the batch's mean loss
    (:func:`mnet.value_and_grad` or its autodiff reference); such an optimizer is then told
    ``batch_gradient=True`` on every step whose keywords leave it so (none, or a padding ``mask`` alone: not a
    dropout draw, nor the row weights of Poisson sampling), and K-FAC computes its direction in factored form."""

    def step(params, opt_state, x, y, optimizer_key=None, **kwargs):
        value, grads = value_and_grad_fn(params, x, y, **kwargs)
        # A Poisson-sampled batch's rows are a buffer: the optimizer (DP noise) is told the batch it stands for; a
        # padded batch's mask goes on too (K-FAC's factors leave the padding out).
        sampled: dict[str, Any] = {name: kwargs[name] for name in ("expected_batch", "mask") if name in kwargs}
        if batch_gradient and set(kwargs) <= {"mask"}:
            sampled["batch_gradient"] = True
        return (*_apply_update(optimizer, grads, params, opt_state, x, y, optimizer_key, **sampled), value)

    return step


def _apply_update(optimizer: optax.GradientTransformation, grads, params, opt_state, x, y, optimizer_key, **extra):
    """``(params, opt_state)`` after one update; an optimizer that takes extra arguments also gets the batch."""
    if isinstance(optimizer, optax.GradientTransformationExtraArgs):
        updates, opt_state = optimizer.update(grads, opt_state, params, inputs=x, targets=y, key=optimizer_key, **extra)
    else:
        updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def make_stateful_step(value_grad_and_state_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """:func:`make_step` carrying the model state: ``(params, opt_state, state, x, y, optimizer_key=None, **kwargs)
    -> (params, opt_state, state, loss value)``. The step's new state comes from the same forward pass as the
    gradient (training mode)."""

    def step(params, opt_state, state, x, y, optimizer_key=None, **kwargs):
        value, grads, state = value_grad_and_state_fn(params, state, x, y, key=kwargs.get("key"))
        params, opt_state = _apply_update(optimizer, grads, params, opt_state, x, y, optimizer_key)
        return params, opt_state, state, value

    return step
