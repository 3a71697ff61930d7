"""The moments of the per-example gradients over a batch, without building the per-example gradients: the sum of
their squares and their variance (BackPACK's ``SumGradSquared`` and ``Variance``).

Derivation. For example ``b`` with loss ``l_b`` and outputs ``y_b``, the GGN diagonal's walk started from one
column ``s_b`` gives ``diag(J_b^T s_b s_b^T J_b) = (J_b^T s_b)^2``. Started from the loss gradient
``s_b = d l_b / d y_b`` in place of the loss Hessian's square root, that is ``g_b ∘ g_b``, the example's gradient
squared, summed over the batch by the walk (:func:`mnet.quantities.ggn.summed_diag_ggn`). A dense layer's share is
then ``(a^2)^T (dz^2)``, one product of squares, with no per-example array; a layer with positions (a convolution's
windows, a sequence) sums each example's positions before squaring, exactly as the GGN diagonal does. The mean
gradient is the ordinary backward pass of the same cotangents divided by the batch (backward is linear in its
cotangent), so the variance ``mean_b g_b^2 - (mean_b g_b)^2`` costs one forward and two backward passes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mnet.core.protocol import Array, LayerProtocol, Params, call_forward
from mnet.losses import Loss, with_mask
from mnet.quantities.ggn import summed_diag_ggn


def _moments(
    net: LayerProtocol, loss: Loss, params: Params, x: Array, targets: Array, state: Any, mask: Array | None
) -> tuple[Params, Any, Array]:
    """``sum_b g_b^2``, the forward cache and the per-example cotangents ``d l_b / d y_b``."""
    masked_loss, targets = with_mask(loss, targets, mask)
    outputs, cache = call_forward(net, params, x, state=state, mask=mask)
    cotangents = masked_loss.per_example_grad(outputs, targets)
    return summed_diag_ggn(net, params, x, cache, cotangents[None], mask), cache, cotangents


def sum_grad_squared(net: LayerProtocol, loss: Loss) -> Callable[..., Params]:
    """``f(params, x, targets)``: ``sum_b g_b ∘ g_b`` over the batch, ``g_b`` the gradient of example ``b``'s own
    loss ``l_b`` (the convention of :func:`mnet.per_example_grads`), without per-example gradients (module text).

    BackPACK's ``SumGradSquared`` of a mean loss is this divided by ``batch^2`` (its per-example gradients are those
    of ``l_b / batch``).

    Returns:
        ``f(params, x, targets, *, state=None, mask=None)``, a pytree like ``params``.
    """

    def sum_grad_squared_fn(
        params: Params, x: Array, targets: Array, *, state: Any = None, mask: Array | None = None
    ) -> Params:
        return _moments(net, loss, params, x, targets, state, mask)[0]

    return sum_grad_squared_fn


def gradient_variance(net: LayerProtocol, loss: Loss) -> Callable[..., Params]:
    """``f(params, x, targets)``: every parameter's variance over the batch of the per-example gradients,
    ``mean_b g_b^2 - (mean_b g_b)^2`` (the population variance, dividing by ``batch``), from one forward and two
    backward passes (module text). Rounding can leave a coordinate whose gradients all agree a hair below zero;
    such values are clipped at zero.

    Returns:
        ``f(params, x, targets, *, state=None, mask=None)``, a pytree like ``params``.
    """

    def gradient_variance_fn(
        params: Params, x: Array, targets: Array, *, state: Any = None, mask: Array | None = None
    ) -> Params:
        squares, cache, cotangents = _moments(net, loss, params, x, targets, state, mask)
        batch = cotangents.shape[0]
        return variance(squares, net.backward(params, cache, cotangents / batch)[0], batch)

    return gradient_variance_fn


def variance(squares: Params, mean: Params, batch: int) -> Params:
    """``squares / batch - mean^2`` leaf by leaf (``squares`` the sum of the per-example gradients squared, ``mean``
    their mean), clipped at zero where rounding leaves a coordinate whose gradients all agree a hair below it."""
    return jax.tree_util.tree_map(lambda s, m: jnp.maximum(s / batch - m * m, 0.0), squares, mean)
