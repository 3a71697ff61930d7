"""Hand-derived gradients of a loss over any network, and the bridge that lets ``jax.grad`` run them.

Nothing here calls JAX's automatic differentiation: the gradient is the loss's hand-derived ``grad`` at the
network output, carried back by the layers' own ``backward`` methods.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from mnet.core.protocol import Array, LayerProtocol, Params, apply_layer, call_forward
from mnet.core.state import update_state
from mnet.core.walk import check_gradient_shapes
from mnet.losses import Loss, with_mask


def value_and_grad(net: LayerProtocol, loss: Loss) -> Callable[[Params, Array, Array], tuple[Array, Params]]:
    """Hand-derived backprop: ``f(params, x, targets) -> (loss value, grads)``.

    One forward pass keeps every layer's cache; the loss supplies ``dL/dy`` by its own formula; the net's
    ``backward`` carries it back to every parameter. ``grads`` has the structure of ``params``.

    Arguments:
        net: any layer (usually a ``serial``; any object with ``init``, ``forward`` and ``backward``).
        loss: a loss from :mod:`mnet.losses` (or any object with ``value`` and ``grad``).

    Returns:
        A pure function, to be wrapped in ``jax.jit`` as usual; the same signature as
        :func:`mnet.autodiff_value_and_grad`, its reference. For a network with dropout, pass
        ``key=...`` and ``train=True`` to draw (and differentiate through) a training-mode mask. For padded
        sequences pass ``mask=`` (``(batch, T)`` booleans, True at tokens): it reaches every attention layer, and
        the padded positions leave the loss (:meth:`mnet.losses.SoftmaxCrossEntropy.masked`). For a network with
        BatchNorm, ``state=`` (from :func:`mnet.init_state`) evaluates it with those running statistics; with
        ``train=True`` it uses the batch's (and :func:`value_grad_and_state` also returns the new statistics).
    """

    def value_and_grad_fn(
        params: Params,
        x: Array,
        targets: Array,
        *,
        key: Array | None = None,
        train: bool = False,
        mask: Array | None = None,
        state: Any = None,
    ) -> tuple[Array, Params]:
        masked_loss, targets = with_mask(loss, targets, mask)
        outputs, cache = call_forward(net, params, x, key, train, state, mask=mask)
        grads, _ = net.backward(params, cache, masked_loss.grad(outputs, targets))
        check_gradient_shapes(net, params, grads)  # a single user layer's backward does not pass through the walk
        return masked_loss.value(outputs, targets), grads

    return value_and_grad_fn


def value_grad_and_state(net: LayerProtocol, loss: Loss) -> Callable[..., tuple[Array, Params, Any]]:
    """A training step's derivatives for a network that keeps state (BatchNorm):
    ``f(params, state, x, targets, *, key=None) -> (loss value, grads, new state)``.

    The forward pass runs in training mode (batch statistics), the hand-derived backward carries the loss gradient
    back through it, and :func:`mnet.update_state` reads the same pass's cache for the next running statistics. For
    a network without state, ``state`` is ``()`` and comes back unchanged.

    Arguments:
        net: any layer; loss: a loss from :mod:`mnet.losses`.

    Returns:
        A pure function, to be wrapped in ``jax.jit``; its reference is
        :func:`mnet.checking.reference.autodiff_value_grad_and_state`.
    """

    def value_grad_and_state_fn(
        params: Params, state: Any, x: Array, targets: Array, *, key: Array | None = None, mask: Array | None = None
    ) -> tuple[Array, Params, Any]:
        masked_loss, targets = with_mask(loss, targets, mask)
        outputs, cache = call_forward(net, params, x, key, True, state, mask=mask)
        grads, _ = net.backward(params, cache, masked_loss.grad(outputs, targets))
        return masked_loss.value(outputs, targets), grads, update_state(net, state, cache)

    return value_grad_and_state_fn


def grad(net: LayerProtocol, loss: Loss) -> Callable[[Params, Array, Array], Params]:
    """Hand-derived gradient alone: ``f(params, x, targets, *, key=None, train=False, mask=None) -> grads``."""
    value_and_grad_fn = value_and_grad(net, loss)

    def grad_fn(params: Params, x: Array, targets: Array, **kwargs) -> Params:
        return value_and_grad_fn(params, x, targets, **kwargs)[1]

    return grad_fn


def with_manual_backward(net: LayerProtocol) -> Callable[[Params, Array], Array]:
    """The network as ``f(params, x) -> y`` whose reverse-mode derivative is the hand-derived backward.

    A ``jax.custom_vjp``: the forward pass saves the layers' caches as residuals, and any ``jax.grad`` or
    ``jax.vjp`` of a function of ``y`` calls ``net.backward`` instead of differentiating ``net.forward``. Use
    it to plug mnet's rules into any JAX code (custom losses, optax, other libraries). Only reverse mode is
    defined: ``jax.jvp``, ``jax.jacfwd`` and ``jax.hessian`` through it raise JAX's error for any ``custom_vjp``.
    Its forward-mode twin is :func:`mnet.with_manual_tangent` (the hand tangent rules), whose docstring has a
    table of which transformation each supports.

    Arguments:
        net: any layer.

    Returns:
        ``f(params, x) -> y``, with ``y`` equal to ``net.apply(params, x)``.
    """

    @jax.custom_vjp
    def apply(params: Params, x: Array) -> Array:
        return apply_layer(net, params, x)

    def apply_forward(params: Params, x: Array) -> tuple[Array, Any]:
        y, cache = net.forward(params, x)
        return y, (params, cache)

    def apply_backward(residuals: Any, dy: Array) -> tuple[Params, Array]:
        params, cache = residuals
        return net.backward(params, cache, dy)

    apply.defvjp(apply_forward, apply_backward)
    return apply
