"""The generalised Gauss-Newton matrix by hand: its diagonal (exact or Monte-Carlo, summed and per example) and its
product with a vector.

Definitions. For a batch, ``L(params) = loss.value(net.apply(params, x), targets)``, the batch mean of the
per-example losses ``l_b``. ``J_b`` is the Jacobian of example ``b``'s outputs with respect to all parameters,
``H_b`` the Hessian of ``l_b`` with respect to example ``b``'s outputs, and the GGN is
``GGN = mean_b J_b^T H_b J_b``. Every loss supplies ``H_b`` in square-root form, ``H_b = sum_c S[c, b] S[c, b]^T``
(:meth:`mnet.losses.Loss.hessian_sqrt`: ``C`` = the number of outputs), or sampled from its own predictive
distribution (:meth:`mnet.losses.Loss.sampled_hessian_sqrt`), so that

    diag(J_b^T H_b J_b) = sum_c (J_b^T S[c, b])^2       (entry by entry)

and ``J_b^T S[c, b]`` is example ``b``'s backward pass of the cotangent ``S[c, b]``. The drivers run one forward
pass and one walk carrying the ``C`` columns down together (:class:`DiagGGN`); each layer with
parameters squares and sums them against its inputs (a dense layer: ``x_b^2 (sum_c S[c, b]^2)^T``), never forming
``J``. A network holding a layer with parameters but no per-example rule is handled one example at a time instead
(its ``backward`` on a batch of one, for every column), which is exact, only slower.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mnet.core.protocol import Array, LayerProtocol, Params, call_forward
from mnet.core.sums import sum_stack
from mnet.core.walk import MissingRule, StackedQuantity
from mnet.errors import SettingError
from mnet.losses import Loss, with_mask
from mnet.quantities.per_example import per_example_stack
from mnet.quantities.tangent import forward_with_tangent


class PerExampleDiagGGN(StackedQuantity):
    """Each example's GGN diagonal, ``diag(J_b^T H_b J_b) = sum_c (J_b^T S[c, b])^2`` entry by entry, from the
    ``(C, batch, *output)`` columns ``S`` of the loss Hessian's square root (``H_b = sum_c S[c, b] S[c, b]^T``).
    A unit's rule is ``per_example_diag_ggn(params, cache, S) -> like params, leaves (batch, *leaf)``; the
    default squares the per-example gradient of every column and sums over the columns."""

    rule = "per_example_diag_ggn"

    def share(self, layer, params, caches, carried):
        per = per_example_stack(layer, params, caches[0], carried[0])
        return jax.tree_util.tree_map(lambda g: sum_stack(g * g), per)


class DiagGGN(StackedQuantity):
    """The GGN diagonal summed over the batch, ``sum_b diag(J_b^T H_b J_b)`` (the driver divides by the batch). A
    unit's rule is ``diag_ggn(params, cache, S) -> like params``; the default sums the per-example diagonal, so a
    layer that overrides only ``per_example_diag_ggn`` serves both."""

    rule = "diag_ggn"

    def share(self, layer, params, caches, carried):
        per_example = PER_EXAMPLE_DIAG_GGN.share_of(layer, params, caches, carried)
        return jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), per_example)


PER_EXAMPLE_DIAG_GGN = PerExampleDiagGGN()

DIAG_GGN = DiagGGN()


def loss_square_root(loss: Loss, outputs: Array, targets: Array, mc_samples: int | None, key: Array | None) -> Array:
    if mc_samples is None:
        return loss.hessian_sqrt(outputs, targets)
    if key is None:
        raise SettingError(f"diag_ggn(mc_samples={mc_samples}) draws samples: pass key=jax.random.key(...)")
    return loss.sampled_hessian_sqrt(outputs, targets, key, mc_samples)


def square_root_columns(
    net: LayerProtocol,
    loss: Loss,
    params: Params,
    x: Array,
    targets: Array,
    mc_samples: int | None,
    key: Array | None,
    state: Any,
    mask: Array | None,
) -> tuple[Any, Array]:
    """The forward pass's cache and the loss Hessian's square-root columns at its outputs (exact, or ``mc_samples``
    draws), the padded positions of ``mask`` left out: where both GGN diagonals start."""
    masked_loss, targets = with_mask(loss, targets, mask)
    outputs, cache = call_forward(net, params, x, state=state, mask=mask)
    return cache, loss_square_root(masked_loss, outputs, targets, mc_samples, key)


def _one_example_at_a_time(net: LayerProtocol, params: Params, x: Array, S: Array, mask: Array | None = None) -> Params:
    """``diag(J_b^T H_b J_b)`` for every example through ``backward`` alone: each example run as a batch of one,
    every column of its ``S`` carried back, the gradients squared and summed over the columns."""

    def one(x_b: Array, S_b: Array, m_b: Array | None) -> Params:
        _, cache = call_forward(net, params, x_b[None], mask=None if m_b is None else m_b[None])
        grads = jax.vmap(lambda column: net.backward(params, cache, column[None])[0])(S_b)
        return jax.tree_util.tree_map(lambda g: sum_stack(g * g), grads)

    return jax.vmap(one)(x, jnp.moveaxis(S, 0, 1), mask)


def check_samples(mc_samples: int | None) -> None:
    if mc_samples is not None and (not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1):
        raise SettingError(f"mc_samples must be a positive int (or None for the exact diagonal), got {mc_samples!r}")


def per_example_diag_ggn(net: LayerProtocol, loss: Loss, mc_samples: int | None = None) -> Callable[..., Params]:
    """``f(params, x, targets[, key=...])``: each example's own GGN diagonal, ``diag(J_b^T H_b J_b)``.

    Arguments:
        net, loss: any network, and a loss with a Hessian square root (every built-in loss).
        mc_samples: None (default) for the exact diagonal; ``S`` for a Monte-Carlo estimate from ``S`` draws per
            example from the loss's predictive distribution (then ``f`` needs ``key=``).

    Returns:
        A pytree like ``params`` whose every leaf has a leading batch axis; :func:`diag_ggn` is its mean.
    """
    check_samples(mc_samples)

    def per_example_diag_ggn_fn(
        params: Params,
        x: Array,
        targets: Array,
        *,
        key: Array | None = None,
        state: Any = None,
        mask: Array | None = None,
    ) -> Params:
        cache, S = square_root_columns(net, loss, params, x, targets, mc_samples, key, state, mask)
        try:
            return PER_EXAMPLE_DIAG_GGN.run(net, params, cache, S)[0]
        except MissingRule:
            return _one_example_at_a_time(net, params, x, S, mask)

    return per_example_diag_ggn_fn


def diag_ggn(net: LayerProtocol, loss: Loss, mc_samples: int | None = None) -> Callable[..., Params]:
    """``f(params, x, targets[, key=...])``: the diagonal of ``GGN = mean_b J_b^T H_b J_b``, exact, or with
    ``mc_samples=S`` an unbiased Monte-Carlo estimate from ``S`` draws per example (``f`` then needs ``key=``).

    Dense layers never build a per-example array: their share is ``(x^2)^T (sum_c S[c]^2)`` over the batch.

    Returns:
        A pytree like ``params``.
    """
    check_samples(mc_samples)

    def diag_ggn_fn(
        params: Params,
        x: Array,
        targets: Array,
        *,
        key: Array | None = None,
        state: Any = None,
        mask: Array | None = None,
    ) -> Params:
        cache, S = square_root_columns(net, loss, params, x, targets, mc_samples, key, state, mask)
        total = summed_diag_ggn(net, params, x, cache, S, mask)
        return jax.tree_util.tree_map(lambda d: d / x.shape[0], total)

    return diag_ggn_fn


def summed_diag_ggn(
    net: LayerProtocol, params: Params, x: Array, cache: Any, S: Array, mask: Array | None = None
) -> Params:
    """``sum_b diag(J_b^T S_b S_b^T J_b)`` from a forward cache and the square-root columns ``S``: the walk, or one
    example at a time for a network with a layer that has no per-example rule."""
    try:
        return DIAG_GGN.run(net, params, cache, S)[0]
    except MissingRule:
        return jax.tree_util.tree_map(sum_stack, _one_example_at_a_time(net, params, x, S, mask))


def ggn_vector_product(net: LayerProtocol, loss: Loss) -> Callable[[Params, Array, Array, Params], Params]:
    """``f(params, x, targets, v) -> GGN v``, ``v`` and the result like ``params``, without forming a matrix.

    ``GGN v = mean_b J_b^T H_b J_b v``: the tangent pass gives ``J v`` at the outputs
    (:func:`mnet.quantities.tangent.forward_with_tangent`), the loss applies its output Hessian
    (:meth:`mnet.losses.Loss.hessian_vector`, which carries the batch mean's ``1 / batch``), and the ordinary
    backward pass takes the result back to every parameter: one forward, one tangent and one backward pass.
    """

    def ggn_vector_product_fn(
        params: Params, x: Array, targets: Array, v: Params, *, state: Any = None, mask: Array | None = None
    ) -> Params:
        masked_loss, targets = with_mask(loss, targets, mask)
        outputs, cache, output_tangent, _ = forward_with_tangent(net, params, x, v, None, state=state, mask=mask)
        return net.backward(params, cache, masked_loss.hessian_vector(outputs, targets, output_tangent))[0]

    return ggn_vector_product_fn
