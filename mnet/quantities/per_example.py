"""Per-example gradients and their norms: each example's own parameter gradient, and the L2 norm of it over all
leaves, by one walk carrying the loss's per-example cotangents down.

Every layer applies its own rule (``per_example_backward``, ``per_example_sq_norms``) or the default: a unit without
parameters passes the cotangents through ``backward``; the norms square the per-example gradients. A network holding
a layer with parameters but no per-example rule (a user's layer that defines ``backward`` only) is handled by the
generic path instead: the hand-derived backward run one example at a time under ``jax.vmap`` (vectorisation, not
differentiation), which is correct for every layer, only slower.

Notation: ``l_b`` is example ``b``'s loss (``loss.per_example``), ``g_b = d l_b / d params`` its gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mnet.core.protocol import Array, Cache, LayerProtocol, Params, call_forward, has_params
from mnet.core.sums import add_trees, batch_sq_norms
from mnet.core.walk import MissingRule, Quantity
from mnet.losses import Loss, with_mask
from mnet.quantities.gradient import value_and_grad


class PerExampleBackward(Quantity):
    """Each example's own parameter gradient, every leaf with a leading batch axis.

    Default: a unit without parameters has nothing per-example to add, so its ``backward`` serves as is; a unit
    with parameters needs its own rule (there is no per-example gradient in ``backward``'s sum over examples)."""

    rule = "per_example_backward"
    carries_cotangents = True

    def tie(self, layer, first, second):
        return add_trees(first, second)  # each example's gradient of a tied parameter: the sum over its uses

    def default(self, layer, params, caches, carried):
        if has_params(params):
            raise MissingRule(layer, self.rule)
        grads, dx = layer.backward(params, caches[0], carried[0])
        return grads, (dx,)


class PerExampleSqNorms(Quantity):
    """``(batch,)`` squared L2 norms of each example's gradient over all leaves; a unit's share is its own leaves'
    part. Default: from the per-example gradients."""

    rule = "per_example_sq_norms"
    carries_cotangents = True

    def default(self, layer, params, caches, carried):
        grads, (dx,) = PER_EXAMPLE_BACKWARD.at_unit(layer, params, caches, carried)
        if not has_params(params):
            return (), (dx,)
        return batch_sq_norms(grads, carried[0].shape[0], carried[0].dtype), (dx,)

    def finish(self, shares, carried):
        dy = carried[0]
        return sum(jax.tree_util.tree_leaves(shares), jnp.zeros((dy.shape[0],), dy.dtype))


PER_EXAMPLE_BACKWARD = PerExampleBackward()

PER_EXAMPLE_SQ_NORMS = PerExampleSqNorms()


def per_example_stack(layer: Any, params: Params, cache: Cache, stack: Array) -> Any:
    """The unit's per-example parameter gradients for every entry of a ``(K, batch, *output)`` stack: leaves
    ``(K, batch, *leaf)``."""
    return jax.vmap(lambda dy: PER_EXAMPLE_BACKWARD.at_unit(layer, params, (cache,), (dy,))[0])(stack)


def _one_at_a_time(net: LayerProtocol, loss: Loss, mask: Array | None = None) -> Callable[..., Params]:
    """Per-example gradients for any layer: the batch-of-one gradient (whose mean is ``l_b`` itself) vmapped
    (``loss`` and the targets already masked when there is a ``mask``; the network gets each example's row)."""
    single = value_and_grad(net, loss)
    if mask is None:
        return jax.vmap(lambda params, x, t: single(params, x[None], t[None])[1], in_axes=(None, 0, 0))

    def one(params: Params, x: Array, t: Array, m: Array) -> Params:
        outputs, cache = call_forward(net, params, x[None], mask=m[None])
        return net.backward(params, cache, loss.grad(outputs, t[None]))[0]

    return lambda params, x, t: jax.vmap(one, in_axes=(None, 0, 0, 0))(params, x, t, mask)


def per_example_grads(net: LayerProtocol, loss: Loss) -> Callable[[Params, Array, Array], Params]:
    """``f(params, x, targets)``: every example's gradient of its own loss ``l_b``.

    One forward pass over the batch; the loss's per-example cotangents ``d l_b / d y_b``; then each layer's
    ``per_example_backward`` (for a dense layer the outer products ``dW_b = a_b dz_b^T`` in one batched product).

    Returns:
        A pytree like ``params`` whose every leaf has a leading batch axis.
    """

    def per_example_grads_fn(
        params: Params, x: Array, targets: Array, *, state: Any = None, mask: Array | None = None
    ) -> Params:
        masked_loss, targets = with_mask(loss, targets, mask)
        outputs, cache = call_forward(net, params, x, state=state, mask=mask)
        try:
            return PER_EXAMPLE_BACKWARD.run(net, params, cache, masked_loss.per_example_grad(outputs, targets))[0]
        except MissingRule:
            return _one_at_a_time(net, masked_loss, mask)(params, x, targets)

    return per_example_grads_fn


def sq_norms(
    net: LayerProtocol,
    loss: Loss,
    params: Params,
    cache: Any,
    x: Array,
    targets: Array,
    outputs: Array,
    mask: Array | None = None,
) -> Array:
    """Every example's squared gradient norm from a forward pass's cache (``loss`` and ``targets`` already masked
    by :func:`mnet.losses.with_mask` when ``mask`` is given)."""
    try:
        return PER_EXAMPLE_SQ_NORMS.run(net, params, cache, loss.per_example_grad(outputs, targets))[0]
    except MissingRule:
        return batch_sq_norms(_one_at_a_time(net, loss, mask)(params, x, targets), x.shape[0], outputs.dtype)


def per_example_grad_norms(net: LayerProtocol, loss: Loss) -> Callable[[Params, Array, Array], Array]:
    """``f(params, x, targets) -> (batch,)``: the L2 norm over all leaves of each example's gradient ``g_b``.

    Dense layers never build ``g_b``: ``||dW_b||^2 = ||a_b||^2 ||dz_b||^2`` and ``||db_b||^2 = ||dz_b||^2``, so the
    cost is one forward and one backward pass of cotangents, plus O(batch * width) per layer.
    """

    def norms_fn(params: Params, x: Array, targets: Array, *, state: Any = None, mask: Array | None = None) -> Array:
        masked_loss, targets = with_mask(loss, targets, mask)
        outputs, cache = call_forward(net, params, x, state=state, mask=mask)
        return jnp.sqrt(sq_norms(net, masked_loss, params, cache, x, targets, outputs, mask))

    return norms_fn
