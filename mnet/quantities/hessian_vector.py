"""Pearlmutter's R-operator: the backward pass differentiated along a tangent, which gives Hessian-vector products.

Derivation. Let ``v`` be a direction in parameter space and ``R{f} = d/dt f(params + t v)`` at ``t = 0`` for any
quantity ``f`` the network computes (Pearlmutter 1994). The gradient is what the backward pass returns, so
``H v = R{gradient}``: differentiate every step of the backward pass along ``v``. Two passes supply what that needs:

1. the forward pass with tangents (:func:`mnet.core.tangent.tangent_walk`): ``R{x}`` at every layer's input,
   ``R{y}`` at the network's output;
2. the loss: ``R{dL/dy} = H_y R{y}``, the loss Hessian in the outputs applied to the output tangent
   (:meth:`mnet.losses.Loss.hessian_vector`);
3. the backward pass carrying two values per stream, the cotangent ``dy`` and its tangent ``R{dy}``: each unit
   maps ``(dy, R{dy})`` to ``(dx, R{dx})`` and contributes ``R{dparams}``, its block of ``H v``.

A unit's rule is ``backward_tangent(params, cache, (dparams, dx_t), dy, dy_t) -> (R{dparams}, dx, R{dx})``, with
``(dparams, dx_t)`` the tangents that reached it on the way up. Where a layer's backward is linear in the
cotangent and does not depend on its input or parameters (a linear map of the input alone, a pool, a mask, a
lookup: ``curvature_free = True``), ``R{backward}(dy) = backward(R{dy})`` and no rule is needed. Dense adds its
two cross terms, an activation its ``phi''(z) R{z} dy``.

The walk is the same walk as every other quantity's (:func:`mnet.core.walk.walk`), with two streams: the caches
with the cotangents, the tangent records with the cotangents' tangents. Combinators pass both alike: the skip of a
residual adds ``R{dy}`` as it adds ``dy``, a concatenation splits both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mnet.core.protocol import Array, LayerProtocol, Params
from mnet.core.sums import add_trees
from mnet.core.walk import Quantity, own_rule, walk
from mnet.errors import LayerError
from mnet.losses import Loss, with_mask
from mnet.quantities.tangent import forward_with_tangent


def no_tangent_rule(layer: Any) -> LayerError:
    return LayerError(
        layer,
        "has no Hessian-vector rule, so hessian_vector_product cannot pass through it: give it a "
        "backward_tangent(params, cache, (dparams, dx_t), dy, dy_t) -> (R{dparams}, dx, R{dx}) method (its backward "
        "differentiated along the tangent), or curvature_free = True if its output is linear in its input and "
        "parameters jointly (no products of the two)",
    )


class HessianVector(Quantity):
    """``H v`` summed over the batch: carries ``(dy, R{dy})`` as two streams, with ``(caches, tangent records)``.
    The share of a unit is ``R{dparams}``."""

    rule = "backward_tangent"

    def tie(self, layer, first, second):
        return add_trees(first, second)  # H v is linear in the shares: a tied parameter's is the sum over its uses

    def at_unit(self, layer, params, caches, carried):
        (cache, record), (dy, dy_tangent) = caches, carried
        own = own_rule(layer, self.rule)
        if own is not None:
            share, dx, dx_tangent = own(params, cache, record, dy, dy_tangent)
            return share, (dx, dx_tangent)
        if not getattr(layer, "curvature_free", False):
            raise no_tangent_rule(layer)
        _, dx = layer.backward(params, cache, dy)
        share, dx_tangent = layer.backward(params, cache, dy_tangent)
        return share, (dx, dx_tangent)


HESSIAN_VECTOR = HessianVector()


def hessian_vector_product(net: LayerProtocol, loss: Loss) -> Callable[..., Params]:
    """``f(params, x, targets, v) -> H v``, ``H`` the Hessian of ``L = loss.value(net.apply(params, x), targets)``.

    Pearlmutter's R-operator by hand (:mod:`mnet.quantities.hessian_vector`): the tangent pass records ``R{x}`` at every
    layer, the loss gives ``R{dL/dy} = H_y J v``, and the backward pass runs carrying the cotangent and its tangent,
    each layer adding its own second-order terms (a dense layer ``R{x}^T dz`` and ``dz dW_t^T``, an activation
    ``phi''(z) R{z} dy``). Dense, Conv2D, pools, activations (Softmax included), Dropout, Flatten, Reshape,
    Embedding, LayerNorm and the combinators have the rule; a layer without one is refused by name.
    """

    def hessian_vector_product_fn(
        params: Params, x: Array, targets: Array, v: Params, *, state: Any = None, mask: Array | None = None
    ) -> Params:
        masked_loss, targets = with_mask(loss, targets, mask)
        outputs, cache, output_tangent, record = forward_with_tangent(net, params, x, v, None, state=state, mask=mask)
        start = (masked_loss.grad(outputs, targets), masked_loss.hessian_vector(outputs, targets, output_tangent))
        return walk(net, HESSIAN_VECTOR, params, (cache, record), start)[0]

    return hessian_vector_product_fn
