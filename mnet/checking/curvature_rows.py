"""The second-order rows of :func:`mnet.check_layer`: ``diag_hessian`` and ``kronecker_factors``, each against JAX
autodiff (``jax.jvp`` of ``jax.grad`` for the Hessian diagonal; ``jax.jacrev`` for the exact GGN block a Kronecker
product stands for)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from mnet.checking import reference
from mnet.checking.layer_report import RuleRow, compare_rule, rule_source
from mnet.core.curvature import Curvature
from mnet.core.paths import at_path, path_keys
from mnet.core.protocol import Array, Params, call_forward, has_params
from mnet.core.walk import walk
from mnet.errors import LayerError
from mnet.quantities.diag_hessian import DIAG_HESSIAN
from mnet.quantities.kronecker import KRONECKER_FACTORS, KroneckerFactors, is_factor_pair, stack_bias, unstack_bias


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


def kronecker_entries(layer: Any, params: Params, one: Array, S: Array) -> tuple[list[tuple[tuple, str]], int]:
    """The dense-like entries whose factors are exact at batch 1 (one position per example), as ``(path into the
    params and the factors, name)``, and how many entries with positions there are. Read from an abstract walk."""
    found: list[Any] = []

    def trace(p: Params, inputs: Array, stack: Array) -> Array:
        found.append(walk(layer, POSITIONED_KRONECKER, p, (call_forward(layer, p, inputs)[1],), (stack,))[0])
        return jnp.zeros(())

    jax.eval_shape(trace, params, one, S)
    entries, skipped = [], 0
    for path, share in jax.tree_util.tree_flatten_with_path(found[0], is_leaf=lambda n: isinstance(n, Positioned))[0]:
        if not isinstance(share, Positioned) or share.factors is None:
            continue
        if share.positions != 1:
            skipped += 1
            continue
        for inner, pair in jax.tree_util.tree_flatten_with_path(share.factors, is_leaf=is_factor_pair)[0]:
            if is_factor_pair(pair):
                entries.append((path_keys(path) + path_keys(inner), jax.tree_util.keystr(path + inner) or "(entry)"))
    return entries, skipped


def kronecker_comparison(
    rule: str, source: str, layer: Any, params: Params, one: Array, S: Array, H: Array, factors_fn: Callable
) -> RuleRow:
    """``kron(A, G)`` of every entry :func:`kronecker_entries` finds (``factors_fn(params)`` gives the factors, a
    tree like the params down to each entry) against the exact GGN block ``J^T H J`` of its ``[W; b]`` for one
    example, compiled together."""
    entries, skipped = kronecker_entries(layer, params, one, S)
    note = f"{skipped} entries with positions not compared (P kron(A, G) approximates their block)" if skipped else ""
    if not entries:
        return RuleRow(rule, source, note=note or "no dense-like entry (None or no parameters)")

    def both(p: Params) -> tuple[dict, dict]:
        factors = factors_fn(p)
        # An entry the layer gives no pair for (None: no Kronecker structure) has nothing to compare.
        found = [(keys, name) for keys, name in entries if is_factor_pair(at_path(factors, keys))]
        mine = {name: jnp.kron(at_path(factors, keys)["A"], at_path(factors, keys)["G"]) for keys, name in found}
        ref = {name: reference.ggn_block(layer, p, one, H, keys, stack_bias, unstack_bias) for keys, name in found}
        return mine, ref

    row = compare_rule(rule, source, *jax.jit(both)(params))
    return RuleRow(row.rule, row.source, row.agreement, row.worst, note) if note and row.ok else row


def kronecker_row(layer: Any, params: Params, x: Array, columns: Array) -> RuleRow:
    """Every dense-like entry's ``kron(A, G)`` for one example (batch 1) against the exact GGN block of its
    ``[W; b]`` for the same two Hessian columns: equal when the unit has one position per example. An entry with
    positions (a sequence, a convolution's windows) is approximated, not equalled, by ``P kron(A, G)``: it is left
    out and counted in the note."""
    one, S = x[:1], columns[:, :1]
    flat_columns = S.reshape(S.shape[0], -1)

    def factors(p: Params) -> Any:
        return walk(layer, KRONECKER_FACTORS, p, (call_forward(layer, p, one)[1],), (S,))[0]

    source = rule_source(layer, "kronecker_factors", params)
    return kronecker_comparison(
        "kronecker_factors", source, layer, params, one, S, flat_columns.T @ flat_columns, factors
    )
