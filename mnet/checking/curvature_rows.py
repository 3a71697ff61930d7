"""The second-order rows of :func:`mnet.check_layer`: ``diag_hessian`` and ``kronecker_factors``, each against JAX
autodiff (``jax.jvp`` of ``jax.grad`` for the Hessian diagonal; ``jax.jacrev`` for the exact GGN block a Kronecker
product stands for)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from mnet.checking import reference
from mnet.checking.layer_report import RuleRow, compare_rule, rule_source
from mnet.core.curvature import Curvature
from mnet.core.paths import path_keys
from mnet.core.protocol import Array, Params, call_forward, has_params
from mnet.core.walk import walk
from mnet.errors import LayerError
from mnet.quantities.diag_hessian import DIAG_HESSIAN
from mnet.quantities.kronecker import KroneckerFactors, is_factor_pair, stack_bias, unstack_bias


def diag_hessian_row(layer: Any, params: Params, x: Array, columns: Array, rng: np.random.Generator) -> RuleRow:
    """The layer's Hessian-diagonal share (its own rule, its ``curvature_free`` default, or the walk through its
    parts) for a random gradient and two random Hessian columns reaching its output, against the diagonal of
    autodiff's Hessian of the same quadratic model loss (:func:`mnet.checking.reference.layer_diag_hessian`)."""
    if not has_params(params):
        return RuleRow("diag_hessian", rule_source(layer, "diag_hessian", params), note="no parameters")
    grad = jnp.asarray(rng.normal(size=columns.shape[1:]), columns.dtype)

    def hand(p, inputs, g, S):
        cache = call_forward(layer, p, inputs)[1]
        return jax.flatten_util.ravel_pytree(walk(layer, DIAG_HESSIAN, p, (cache,), (Curvature.start(g, S),))[0])[0]

    try:
        mine = jax.jit(hand)(params, x, grad, columns)
    except LayerError as missing:
        return RuleRow("diag_hessian", "absent", note=str(missing))
    size = mine.shape[0]
    coordinates, note = None, ""
    if size > reference.DIAG_HESSIAN_COORDINATES:
        coordinates = jnp.asarray(np.sort(rng.choice(size, reference.DIAG_HESSIAN_COORDINATES, replace=False)))
        mine, note = mine[coordinates], f"{reference.DIAG_HESSIAN_COORDINATES} of {size} coordinates, at random"
    ref = jax.jit(lambda *arguments: reference.layer_diag_hessian(layer, *arguments))(
        params, x, grad, columns, coordinates
    )
    row = compare_rule("diag_hessian", rule_source(layer, "diag_hessian", params), mine, ref)
    return RuleRow(row.rule, row.source, row.agreement, row.worst, note) if note and row.ok else row


class Positioned:
    """A unit's Kronecker factors with the number of output positions they were averaged over (not a pytree node,
    so that the walk's tree keeps it whole)."""

    def __init__(self, factors: Any, positions: int):
        self.factors, self.positions = factors, positions


class _PositionedKronecker(KroneckerFactors):
    """The Kronecker-factor walk, each unit's share kept with its positions (read from the carried stack's shape)."""

    def share_of(self, layer, params, caches, carried):
        return Positioned(super().share_of(layer, params, caches, carried), math.prod(carried[0].shape[2:-1]))


POSITIONED_KRONECKER = _PositionedKronecker()


def kronecker_row(layer: Any, params: Params, x: Array, columns: Array) -> RuleRow:
    """Every dense-like entry's ``kron(A, G)`` for one example (batch 1) against the exact GGN block of its
    ``[W; b]`` for the same two Hessian columns: equal when the unit has one position per example. An entry with
    positions (a sequence, a convolution's windows) is approximated, not equalled, by ``P kron(A, G)``: it is left
    out and counted in the note."""
    one, S = x[:1], columns[:, :1]
    flat_columns = S.reshape(S.shape[0], -1)
    output_hessian = flat_columns.T @ flat_columns

    def hand(p, inputs, stack):
        return walk(layer, POSITIONED_KRONECKER, p, (call_forward(layer, p, inputs)[1],), (stack,))[0]

    shares = jax.tree_util.tree_flatten_with_path(
        hand(params, one, S), is_leaf=lambda node: isinstance(node, Positioned)
    )[0]
    mine, ref, skipped = {}, {}, 0
    for path, share in shares:
        if not isinstance(share, Positioned) or share.factors is None:
            continue
        keys = path_keys(path)
        if share.positions != 1:
            skipped += 1
            continue
        pairs = jax.tree_util.tree_flatten_with_path(share.factors, is_leaf=is_factor_pair)[0]
        for inner, pair in pairs:
            if not is_factor_pair(pair):
                continue
            where = keys + path_keys(inner)
            name = jax.tree_util.keystr(path + tuple(inner)) or "(entry)"
            mine[name] = jnp.kron(pair["A"], pair["G"])
            ref[name] = reference.ggn_block(layer, params, one, output_hessian, where, stack_bias, unstack_bias)
    source = rule_source(layer, "kronecker_factors", params)
    note = f"{skipped} entries with positions not compared (P kron(A, G) approximates their block)" if skipped else ""
    if not mine:
        return RuleRow("kronecker_factors", source, note=note or "no dense-like entry (None or no parameters)")
    row = compare_rule("kronecker_factors", source, mine, ref)
    return RuleRow(row.rule, row.source, row.agreement, row.worst, note) if note and row.ok else row
