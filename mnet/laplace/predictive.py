"""The linearised predictive: the output covariance ``J(x) Lambda^-1 J(x)^T`` by one walk carrying a cotangent per
output, each layer contracting its own Jacobian block against its posterior block (no whole Jacobian), and the
sampled predictive through the hand-derived Jacobian-vector product."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from mnet.core.protocol import Array, Params, call_forward
from mnet.core.tangent import tangent_walk
from mnet.core.walk import MissingRule, StackedQuantity
from mnet.laplace.structure import KronBlock, map_entries
from mnet.quantities.jacobian import jacobian, output_basis
from mnet.quantities.kronecker import stack_bias, unstack_bias
from mnet.quantities.per_example import per_example_stack


def normal_like(key: Array, like: Params) -> Params:
    leaves, treedef = jax.tree_util.tree_flatten(like)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    )


def scale_by_root(entries: Any, curvature: Any, eps: Params, like: Params, alpha) -> Params:
    def scale(entry, curv, e, p):
        if isinstance(entry, KronBlock):
            root = 1 / jnp.sqrt(jnp.outer(entry.A_vals, entry.G_vals) + alpha)
            return unstack_bias(entry.A_vecs @ (stack_bias(e) * root) @ entry.G_vecs.T, p)
        return jax.tree_util.tree_map(lambda d, n: n / jnp.sqrt(d + alpha), curv, e)

    return map_entries(scale, entries, curvature, eps, like)


def block_covariance(J: Any, entry: Any, variances: Any, alpha: Array) -> Array:
    """``(batch, K, K)``: one layer entry's share of ``J Lambda^-1 J^T`` from its per-example gradients ``J`` (leaves
    ``(K, batch, *leaf)``): against a :class:`KronBlock` in its eigenbasis, where the block's inverse is diagonal,
    ``(U^T M V) / (a g^T + alpha)`` contracted with ``U^T M' V``; else leaf by leaf against the variances."""
    if isinstance(entry, KronBlock):
        rotated = jnp.einsum("ia,kbij,jc->kbac", entry.A_vecs, stack_bias(J), entry.G_vecs)
        weights = 1 / (jnp.outer(entry.A_vals, entry.G_vals) + alpha)
        return jnp.einsum("kbac,jbac,ac->bkj", rotated, rotated, weights)
    shares = [
        jnp.einsum("kbp,jbp,p->bkj", g.reshape(g.shape[:2] + (-1,)), g.reshape(g.shape[:2] + (-1,)), v.reshape(-1))
        for g, v in zip(jax.tree_util.tree_leaves(J), jax.tree_util.tree_leaves(variances))
    ]
    return sum(shares[1:], shares[0])


class FunctionCovariance(StackedQuantity):
    """``J Lambda^-1 J^T`` per example, one layer's block at a time: the walk carries one cotangent per network output
    (as for the NTK), every unit with parameters takes its per-example gradients for all of them (its own block of
    the Jacobian, nothing more) and contracts them against its block of the posterior covariance at once.

    A unit's posterior block is found by the identity of its parameter arrays: the walk hands every unit the arrays
    of the params tree it was given (combinators and compound layers index and regroup, never copy), so a table
    from each array's ``id`` to its entry, built from that same tree inside the trace, serves every built-in layer.
    A unit whose arrays are not in the table (a user's compound layer that transforms its parameters) raises
    :class:`MissingRule`, and the caller contracts the whole Jacobian instead."""

    rule = "function_covariance"  # no layer has one: every share comes from the per-example rule

    def __init__(self, table: dict[int, tuple[Any, Any]], alpha: Array):
        self.table, self.alpha = table, alpha

    def share(self, layer, params, caches, carried):
        leaves = jax.tree_util.tree_leaves(params)
        if any(id(leaf) not in self.table for leaf in leaves):
            raise MissingRule(layer, self.rule)
        found = [self.table[id(leaf)] for leaf in leaves]
        J = per_example_stack(layer, params, caches[0], carried[0])
        blocks = [entry for entry, _ in found if isinstance(entry, KronBlock)]
        if blocks:  # a dense-like unit: one Kronecker block over its [W; b]
            return block_covariance(J, blocks[0], None, self.alpha)
        return block_covariance(J, None, [variance for _, variance in found], self.alpha)

    def finish(self, shares, carried):
        stack = carried[0]
        empty = jnp.zeros((stack.shape[1], stack.shape[0], stack.shape[0]), stack.dtype)
        return sum(jax.tree_util.tree_leaves(shares), empty)


def posterior_table(entries: Any, curvature: Any, params: Params, alpha: Array) -> dict[int, tuple[Any, Any]]:
    """``id(parameter array) -> (KronBlock or None, its variances or None)`` for every array of ``params``."""
    table: dict[int, tuple[Any, Any]] = {}

    def visit(entry, curv, p):
        if isinstance(entry, KronBlock):
            for leaf in jax.tree_util.tree_leaves(p):
                table[id(leaf)] = (entry, None)
        else:
            for leaf, d in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(curv)):
                table[id(leaf)] = (None, 1 / (d + alpha))

    map_entries(visit, entries, curvature, params)
    return table


@partial(jax.jit, static_argnums=(0,))
def batch_functional_covariance(net, entries, curvature, params, x, alpha, mask=None):
    f, cache = call_forward(net, params, x, mask=mask)
    try:
        quantity = FunctionCovariance(posterior_table(entries, curvature, params, alpha), alpha)
        return f, quantity.run(net, params, cache, output_basis(f))[0]
    except MissingRule:
        pass
    # The whole Jacobian of the batch, contracted entry by entry.
    jac = jacobian(net)(params, x, mask=mask)
    batch, K = f.shape[0], math.prod(f.shape[1:])
    shares: list[Array] = []

    def share(entry, curv, J):
        if not jax.tree_util.tree_leaves(J):
            return
        J = jax.tree_util.tree_map(lambda leaf: jnp.moveaxis(leaf.reshape((batch, K) + leaf.shape[f.ndim :]), 1, 0), J)
        variances = None if isinstance(entry, KronBlock) else jax.tree_util.tree_map(lambda d: 1 / (d + alpha), curv)
        shares.append(block_covariance(J, entry if isinstance(entry, KronBlock) else None, variances, alpha))

    map_entries(share, entries, curvature, jac)
    return f, sum(shares, jnp.zeros((batch, K, K), f.dtype))


@partial(jax.jit, static_argnums=(0, 1, 8))
def sampled_moments(net, loss, entries, curvature, params, x, alpha, key, samples, mask=None):
    """The mean over ``samples`` draws of the linearised model's prediction (probabilities for classification,
    outputs for regression), and of its square."""
    f, cache = call_forward(net, params, x, mask=mask)

    def one(carry, k):
        delta = scale_by_root(entries, curvature, normal_like(k, params), params, alpha)
        df, _ = tangent_walk(net, params, cache, delta, None)
        value = loss.predictive(f + df)
        return (carry[0] + value, carry[1] + value * value), None

    (first, second), _ = jax.lax.scan(one, (jnp.zeros_like(f), jnp.zeros_like(f)), jax.random.split(key, samples))
    return first / samples, second / samples
