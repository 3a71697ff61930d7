"""The exact Hessian diagonal: the quantity that carries a :class:`mnet.core.curvature.Curvature` down the
network, the default rule of a layer without structure of its own, and the driver.

The derivation and the representation of what is carried are in :mod:`mnet.core.curvature`, beside the helpers the
layers' own ``diag_hessian`` rules use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mnet.core.curvature import Curvature, no_rule, signed_square_sum
from mnet.core.protocol import Array, LayerProtocol, Params, call_forward, has_params
from mnet.core.walk import Quantity, own_rule, walk
from mnet.losses import Loss
from mnet.quantities.per_example import per_example_stack


class DiagHessian(Quantity):
    """The Hessian diagonal summed over the batch (the driver divides by it). Carries a :class:`Curvature`. A
    unit's rule is ``diag_hessian(params, cache, curvature) -> (share like params, curvature at the input)``;
    the default serves a layer that declares ``curvature_free = True`` (zero second derivative in its input and in
    each parameter: linear maps, pools, ReLU-like masks): columns through ``backward``, the share from the
    per-example gradient of every column. Any other layer without a rule is refused by name."""

    rule = "diag_hessian"

    def at_unit(self, layer, params, caches, carried):
        own = own_rule(layer, self.rule)
        if own is not None:
            share, curvature = own(params, caches[0], carried[0])
            return share, (curvature,)
        if not getattr(layer, "curvature_free", False):
            raise no_rule(layer)
        cache, curvature = caches[0], carried[0].expanded()
        below = curvature.through(lambda dy: layer.backward(params, cache, dy)[1])
        if not has_params(params):
            return (), (below,)

        def squares(columns: Array) -> Params:
            per_example = per_example_stack(layer, params, cache, columns)
            return jax.tree_util.tree_map(lambda g: g * g, per_example)

        share = signed_square_sum(curvature.groups, squares)
        return jax.tree_util.tree_map(lambda d: jnp.sum(d, axis=0), share), (below,)

    def fork(self, value):
        return value.expanded()

    def split(self, value, bounds):
        return value.split(bounds)

    def join(self, a, b):
        return a.join(b)


DIAG_HESSIAN = DiagHessian()


def diag_hessian(net: LayerProtocol, loss: Loss) -> Callable[..., Params]:
    """``f(params, x, targets)``: the exact diagonal of ``H``, the Hessian of ``L = mean_b l_b`` with respect to
    every parameter.

    ``H = GGN + (the layers' own second-derivative terms)``: the walk carries each example's Hessian with respect to
    the current activation as signed columns plus a diagonal (:mod:`mnet.core.curvature`), starting from the
    loss Hessian's square root; every activation adds ``phi''(z) * g`` (``g`` the gradient reaching it) to the
    diagonal. Dense, Conv2D, pools, elementwise activations, Dropout, Flatten, Reshape, Embedding and the
    combinators have second-order rules; a network holding any other layer (LayerNorm, Softmax, attention, a
    user's layer without a ``diag_hessian`` rule or ``curvature_free = True``) raises an error naming it.

    Returns:
        A pytree like ``params``.
    """

    def diag_hessian_fn(params: Params, x: Array, targets: Array, *, state: Any = None) -> Params:
        outputs, cache = call_forward(net, params, x, state=state)
        start = Curvature.start(loss.per_example_grad(outputs, targets), loss.hessian_sqrt(outputs, targets))
        total = walk(net, DIAG_HESSIAN, params, (cache,), (start,))[0]
        return jax.tree_util.tree_map(lambda d: d / x.shape[0], total)

    return diag_hessian_fn
