"""The empirical neural tangent kernel, ``sum_k sum_p J1[a, k, p] J2[c, k, p]`` over two batches, by one walk with
two streams: each carries ``(K, batch, *output)`` cotangents (one per network output ``k``) down its batch's caches,
and every unit with parameters contracts its share (its own ``ntk_contribution`` or the per-example default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mnet.core.protocol import Array, LayerProtocol, Params, call_forward
from mnet.core.walk import MissingRule, StackedQuantity, walk
from mnet.quantities.jacobian import jacobian, output_basis
from mnet.quantities.per_example import per_example_stack


def contract_stacks(per1: Any, per2: Any) -> Array:
    """``(batch1, batch2)``: ``sum_k <g1[k, a], g2[k, c]>`` over every leaf of two per-example stacks (leaves
    ``(K, batch, *leaf)``): the NTK share of per-example gradients."""
    leaves1, leaves2 = jax.tree_util.tree_leaves(per1), jax.tree_util.tree_leaves(per2)
    total = jnp.zeros((leaves1[0].shape[1], leaves2[0].shape[1]), leaves1[0].dtype)
    for g1, g2 in zip(leaves1, leaves2):
        total = total + jnp.einsum("kap,kcp->ac", g1.reshape(g1.shape[:2] + (-1,)), g2.reshape(g2.shape[:2] + (-1,)))
    return total


class NeuralTangentKernel(StackedQuantity):
    """The empirical NTK of two batches, ``sum_k sum_p J1[a, k, p] J2[c, k, p]``: two streams, each carrying
    ``(K, batch, *output)`` cotangents (one per network output ``k``). A unit's rule is
    ``ntk_contribution(params, cache1, cache2, dys1, dys2) -> (batch1, batch2)``; the default contracts the
    per-example gradients of every output."""

    rule = "ntk_contribution"

    def share(self, layer, params, caches, carried):
        return contract_stacks(*(per_example_stack(layer, params, c, stack) for c, stack in zip(caches, carried)))

    def finish(self, shares, carried):
        dys1, dys2 = carried
        return sum(jax.tree_util.tree_leaves(shares), jnp.zeros((dys1.shape[1], dys2.shape[1]), dys1.dtype))

    def run_pair(self, layer, params, caches: tuple, carried: tuple) -> Array:
        shares, _ = walk(layer, self, params, caches, carried)
        return self.finish(shares, carried)


NTK = NeuralTangentKernel()


def ntk(net: LayerProtocol) -> Callable[[Params, Array, Array], Array]:
    """``f(params, x1, x2) -> (batch1, batch2)``: the empirical neural tangent kernel traced over the outputs,
    ``Theta[a, c] = sum_k sum_p (dy_k(x1_a)/dp) (dy_k(x2_c)/dp)``.

    Built layer by layer from cotangents, never from the Jacobian: for a dense layer the contribution is
    ``(A1 A2^T + 1) * sum_k D1_k D2_k^T``, where ``A`` are the layer's inputs and ``D_k`` the cotangent of output
    ``k`` at its pre-activation. ``mask`` and ``mask2``: the padding masks of the two batches.
    """

    def ntk_fn(
        params: Params,
        x1: Array,
        x2: Array,
        *,
        state: Any = None,
        mask: Array | None = None,
        mask2: Array | None = None,
    ) -> Array:
        y1, cache1 = call_forward(net, params, x1, state=state, mask=mask)
        y2, cache2 = call_forward(net, params, x2, state=state, mask=mask2)
        try:
            return NTK.run_pair(net, params, (cache1, cache2), (output_basis(y1), output_basis(y2)))
        except MissingRule:
            jac = jacobian(net)
            return contract_jacobians(jac(params, x1, mask=mask), jac(params, x2, mask=mask2))

    return ntk_fn


def contract_jacobians(jacobian1: Params, jacobian2: Params) -> Array:
    """The NTK from two materialised Jacobians (leaves ``(batch, *output_shape, *leaf.shape)``): the inner product
    of example ``a``'s and example ``c``'s Jacobians over outputs and parameters, summed over the leaves."""
    leaves1, leaves2 = jax.tree_util.tree_leaves(jacobian1), jax.tree_util.tree_leaves(jacobian2)
    total = jnp.zeros((leaves1[0].shape[0], leaves2[0].shape[0]), leaves1[0].dtype)
    for a, b in zip(leaves1, leaves2):
        total = total + jnp.einsum("ap,cp->ac", a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))
    return total
