"""``check_layer``: one call that checks every rule a layer has against JAX autodiff, for users writing their own.

In float64 (JAX x64, switched on for the check alone), at random parameters and inputs, each rule is compared with
its reference from :mod:`mnet.checking.reference`:

=========================  ===========================================================================
rule                       reference
=========================  ===========================================================================
``init``                   the output shape ``init`` reports equals the shape ``forward`` produces
``apply``                  equals ``forward(...)[0]`` (when the layer has ``apply``)
``backward``               ``jax.vjp`` of the layer's output, parameters and (floating) input
``backward[train]``        the same in training mode with a fixed key (layers with randomness)
``per_example_backward``   ``jax.vjp`` of each example's output alone, run as a batch of one, vmapped
``per_example_sq_norms``   the squared norms of those per-example gradients
``ntk_contribution``       ``sum_k <g1[k, a], g2[k, c]>`` over two batches and two cotangents per example
``per_example_diag_ggn``   ``sum_c g[c, b]^2`` for two random columns ``S[c]`` of a loss-Hessian square root
``diag_ggn``               its sum over the batch
``kronecker_factors``      ``kron(A, G)`` of every dense-like entry at batch 1 against the exact GGN block
                           ``J^T (sum_c S_c S_c^T) J`` (``jax.jacrev``), for entries with one position per example
``diag_hessian``           the diagonal of the Hessian (``jax.jvp`` of ``jax.grad``) of a quadratic model loss whose
                           gradient and Hessian at the output are random (a sample of 512 coordinates for a large
                           layer)
``tangent``                ``jax.jvp`` of the layer's output along random parameter and input tangents
``backward_tangent``       ``jax.jvp`` of ``jax.vjp``: the backward pass differentiated along the same tangents
``initial_state``,         (a layer with state) evaluation mode runs on the first state and on the one a training
``updated_state``          pass leaves, which keeps the structure, shapes and dtypes and is finite
=========================  ===========================================================================

A rule the layer does not define is checked in the form mnet will use: its default (derived from ``backward``),
or, for a composite layer, the walk through its parts. A layer with parameters but no per-example rule has no
default (mnet then runs the network one example at a time): its row says so and does not fail the check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnet.checking import reference
from mnet.checking.agreement import Agreement
from mnet.checking.curvature_rows import diag_hessian_row, kronecker_row
from mnet.checking.layer_report import (
    Check,
    LayerReport,
    RuleRow,
    compare_rule,
    compared_rows,
    perturbed,
    random_input,
    rule_source,
)
from mnet.core.protocol import (
    LayerProtocol,
    Shape,
    call_forward,
    has_params,
    init_layer,
    is_stateful,
    is_stochastic,
    require_layer,
)
from mnet.core.state import init_state, update_state
from mnet.core.sums import batch_sq_norms
from mnet.core.tangent import tangent_walk
from mnet.core.walk import MissingRule, walk
from mnet.errors import LayerError
from mnet.quantities.ggn import DIAG_GGN, PER_EXAMPLE_DIAG_GGN
from mnet.quantities.hessian_vector import HESSIAN_VECTOR
from mnet.quantities.ntk import NTK
from mnet.quantities.per_example import PER_EXAMPLE_BACKWARD, PER_EXAMPLE_SQ_NORMS


def _forward_mode_rows(layer: Any, params: Any, x: jax.Array, dy: jax.Array, rng: np.random.Generator) -> list:
    """The ``tangent`` and ``backward_tangent`` rows: random tangents of the parameters, the (floating) input and
    the cotangent; a rule the layer lacks is reported absent (``jvp`` and Hessian-vector products then refuse it)."""

    def draw(a):
        return jnp.asarray(rng.normal(size=np.shape(a)), jnp.asarray(a).dtype)

    dparams = jax.tree_util.tree_map(draw, params)
    dx = draw(x) if jnp.issubdtype(x.dtype, jnp.floating) else None
    dy_tangent = draw(dy)

    def hand_tangent(p, inputs, dp, t):
        out = tangent_walk(layer, p, call_forward(layer, p, inputs)[1], dp, t)[0]
        return jnp.zeros_like(dy) if out is None else out

    def hand_backward_tangent(p, inputs, dp, t, c, ct):
        cache = call_forward(layer, p, inputs)[1]
        record = tangent_walk(layer, p, cache, dp, t)[1]
        hv, (_, dx_tangent) = walk(layer, HESSIAN_VECTOR, p, (cache, record), (c, ct))
        return (hv, dx_tangent) if t is not None else hv

    def ref_backward_tangent(p, inputs, dp, t, c, ct):
        hv, dx_tangent = reference.layer_backward_tangent(layer, p, inputs, c, dp, t, ct)
        return (hv, dx_tangent) if t is not None else hv

    def ref_tangent(p, inputs, dp, t):
        return reference.layer_jvp(layer, p, inputs, dp, t)

    def source(rule: str) -> str:
        found = rule_source(layer, rule, params)
        return "default" if found == "absent" else found

    checks = [
        Check("tangent", source("tangent"), hand_tangent, ref_tangent, (params, x, dparams, dx)),
        Check(
            "backward_tangent",
            source("backward_tangent"),
            hand_backward_tangent,
            ref_backward_tangent,
            (params, x, dparams, dx, dy, dy_tangent),
        ),
    ]
    return compared_rows(checks, (LayerError,), str)


def check_layer(layer: LayerProtocol, input_shape: Shape, *, batch: int = 4, seed: int = 0) -> LayerReport:
    """Check every rule of ``layer`` against JAX autodiff in float64, at random parameters and inputs.

    Arguments:
        layer: any layer (an object with ``init``, ``forward`` and ``backward``), a network included.
        input_shape: one example's shape (no batch axis), as ``init`` takes it.
        batch: examples per random batch (the NTK's second batch has one more).
        seed: seeds the parameters, inputs and cotangents.

    Returns:
        A :class:`LayerReport`: ``report.ok``, ``report.wrong`` (the names of the rules that disagree),
        ``str(report)`` a table, ``report.to_dict()`` plain data.
    """
    require_layer(layer, "check_layer: the argument")
    with jax.enable_x64(True):
        return _check(layer, tuple(input_shape), batch, seed)


class _Evaluating:
    """A layer that keeps state (BatchNorm), run in evaluation mode at a fixed state: every rule is the layer's own,
    only ``forward`` passes the state. check_layer checks the per-example rules this way, since in training mode
    they are refused (each example's output depends on the whole batch)."""

    stateful = False  # the state is fixed inside

    def __init__(self, layer: Any, state: Any):
        self.layer, self.state = layer, state

    def init(self, key, input_shape, dtype=None):
        return init_layer(self.layer, key, input_shape, dtype)

    def forward(self, params, x):
        return self.layer.forward(params, x, state=self.state, train=False)

    def apply(self, params, x):
        return self.forward(params, x)[0]

    def __getattr__(self, name: str):
        return getattr(self.layer, name)

    def __repr__(self) -> str:
        return repr(self.layer)


def _check(layer: Any, input_shape: tuple[int, ...], batch: int, seed: int) -> LayerReport:
    if is_stateful(layer):
        training = _check_rules(layer, input_shape, batch, seed, stateless=True)
        _, params = init_layer(layer, jax.random.key(seed), input_shape, jnp.float64)
        rng = np.random.default_rng(seed + 7)
        state = jax.tree_util.tree_map(  # running statistics away from 0 and 1, the variance positive
            lambda s: s + jnp.asarray(np.abs(rng.normal(size=np.shape(s))), s.dtype),
            init_state(layer, params, input_shape, jnp.float64),
        )
        evaluating = _check_rules(_Evaluating(layer, state), input_shape, batch, seed)
        rows = tuple(replace(row, rule=f"{row.rule}[train]") for row in training.rows if row.rule in TRAINING_RULES)
        return replace(evaluating, rows=evaluating.rows + rows + _state_rows(layer, params, input_shape, batch, rng))
    return _check_rules(layer, input_shape, batch, seed)


def _state_rows(layer: Any, params: Any, input_shape: tuple[int, ...], batch: int, rng: np.random.Generator) -> tuple:
    """``initial_state`` and ``updated_state``: evaluation mode runs on the first state and on the one a training
    pass leaves, with outputs of the training outputs' shape, and the update keeps the state's structure, shapes and
    dtypes, finite. (What the running statistics should be is the layer's own contract: BatchNorm's is tested
    against its formula.)"""
    first = init_state(layer, params, input_shape, jnp.float64)
    x = random_input(layer, (batch,) + input_shape, rng)
    y, cache = call_forward(layer, params, x, train=True, state=first)
    moved = update_state(layer, first, cache)

    def structure(tree: Any) -> Any:
        return jax.tree_util.tree_map(lambda a: (jnp.shape(a), str(jnp.asarray(a).dtype)), tree)

    def evaluation_problem(state: Any) -> str:
        try:
            evaluated = call_forward(layer, params, x, train=False, state=state)[0]
        except LayerError as refused:
            return f"evaluation mode refuses it: {refused}"
        return "" if jnp.shape(evaluated) == jnp.shape(y) else f"evaluation gives {jnp.shape(evaluated)}"

    updated = evaluation_problem(moved)
    if structure(moved) != structure(first):
        updated = f"the state moved from {structure(first)} to {structure(moved)}; " + updated
    elif not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(moved)):
        updated = "the moved state is not finite; " + updated
    notes = {"initial_state": evaluation_problem(first), "updated_state": updated.strip("; ")}
    return tuple(
        RuleRow(rule, "own", Agreement.of(0.0 if not note else np.nan, 0.0, 0.0), note=note)
        for rule, note in notes.items()
    )


#: The rules of a stateful layer that training mode has (the per-example ones refuse it).
TRAINING_RULES = ("backward", "tangent", "backward_tangent")


@dataclass(frozen=True)
class _Draws:
    """The random point every rule is checked at: parameters moved off their initial values (so that a
    zero-initialised bias cannot hide a wrong bias rule), two batches, cotangents, and two columns of a loss-Hessian
    square root."""

    output_shape: tuple[int, ...]
    params: Any
    x: jax.Array
    x2: jax.Array
    y: jax.Array
    dy: jax.Array
    dys1: jax.Array
    dys2: jax.Array
    columns: jax.Array

    @property
    def floating_input(self) -> bool:
        return bool(jnp.issubdtype(self.x.dtype, jnp.floating))


def _draw(layer: Any, input_shape: tuple[int, ...], batch: int, seed: int, rng: np.random.Generator) -> _Draws:
    output_shape, params = init_layer(layer, jax.random.key(seed), input_shape, jnp.float64)
    params = perturbed(params, rng)
    x = random_input(layer, (batch,) + input_shape, rng)
    x2 = random_input(layer, (batch + 1,) + input_shape, rng)
    y, _ = jax.jit(lambda p, inputs: call_forward(layer, p, inputs))(params, x)

    def normal(shape: tuple[int, ...]) -> jax.Array:
        return jnp.asarray(rng.normal(size=shape), y.dtype)

    return _Draws(
        tuple(output_shape),
        params,
        x,
        x2,
        y,
        normal(y.shape),
        normal((2,) + y.shape),
        normal((2, batch + 1) + y.shape[1:]),
        normal((2,) + y.shape),
    )


def _check_rules(
    layer: Any, input_shape: tuple[int, ...], batch: int, seed: int, stateless: bool = False
) -> LayerReport:
    """Every rule of ``layer`` against autodiff; ``stateless`` leaves out the per-example and curvature rows."""
    rng = np.random.default_rng(seed)
    d = _draw(layer, input_shape, batch, seed, rng)
    rows = _first_order_rows(layer, d, seed)
    if not stateless:
        rows += _per_example_rows(layer, d)
        rows.append(kronecker_row(layer, d.params, d.x, d.columns))
        rows.append(diag_hessian_row(layer, d.params, d.x, d.columns, rng))
    rows.extend(_forward_mode_rows(layer, d.params, d.x, d.dy, rng))
    return LayerReport(repr(layer), input_shape, batch, tuple(rows))


def _first_order_rows(layer: Any, d: _Draws, seed: int) -> list[RuleRow]:
    """``init`` (the shape it reports), ``apply``, ``backward`` and, for a layer with randomness, ``backward`` in
    training mode."""
    shapes_agree = d.output_shape == tuple(d.y.shape[1:])
    rows = [
        RuleRow(
            "init",
            "own",
            Agreement.of(0.0 if shapes_agree else np.nan, 0.0, 0.0),
            note="" if shapes_agree else f"init reports {d.output_shape}, forward gives {tuple(d.y.shape[1:])}",
        )
    ]
    if callable(getattr(layer, "apply", None)):
        rows.append(compare_rule("apply", "own", jax.jit(layer.apply)(d.params, d.x), d.y))

    def hand_backward(p, inputs, cotangent, key=None, train=False):
        grads, dx = layer.backward(p, call_forward(layer, p, inputs, key, train)[1], cotangent)
        return (grads, dx) if d.floating_input else grads

    def ref_backward(p, inputs, cotangent, key=None, train=False):
        grads, dx = reference.layer_vjp(layer, p, inputs, cotangent, key=key, train=train)
        return (grads, dx) if d.floating_input else grads

    source = "walk" if callable(getattr(layer, "walk", None)) else "own"
    arguments = (d.params, d.x, d.dy)
    rows.append(compare_rule("backward", source, jax.jit(hand_backward)(*arguments), jax.jit(ref_backward)(*arguments)))
    if is_stochastic(layer):
        key = jax.random.key(seed + 1)
        mine = jax.jit(hand_backward, static_argnames="train")(*arguments, key, True)
        ref = jax.jit(ref_backward, static_argnames="train")(*arguments, key, True)
        rows.append(compare_rule("backward[train]", "own", mine, ref))
    return rows


def _per_example_rows(layer: Any, d: _Draws) -> list[RuleRow]:
    """The per-example rules, the NTK share and the GGN diagonals, each against its per-example ``jax.vjp``
    reference; a rule mnet cannot derive is reported absent (the drivers then go one example at a time)."""

    per_example, per_example_ref, sq_norms_ref, ntk_ref, diag_ggn_ref = _per_example_references(layer, d)

    checks: list[tuple[str, Callable, Callable, tuple]] = [
        ("per_example_backward", per_example, per_example_ref, (d.params, d.x, d.dy)),
        (
            "per_example_sq_norms",
            lambda p, inputs, cotangent: PER_EXAMPLE_SQ_NORMS.run(layer, p, _cache_of(layer, p, inputs), cotangent)[0],
            sq_norms_ref,
            (d.params, d.x, d.dy),
        ),
        (
            "ntk_contribution",
            lambda p, a, b, d1, d2: NTK.run_pair(layer, p, (_cache_of(layer, p, a), _cache_of(layer, p, b)), (d1, d2)),
            ntk_ref,
            (d.params, d.x, d.x2, d.dys1, d.dys2),
        ),
    ]
    for quantity, each_example in ((PER_EXAMPLE_DIAG_GGN, True), (DIAG_GGN, False)):
        checks.append(
            (
                quantity.rule,
                lambda p, inputs, S, q=quantity: q.run(layer, p, _cache_of(layer, p, inputs), S)[0],
                lambda p, inputs, S, e=each_example: diag_ggn_ref(p, inputs, S, e),
                (d.params, d.x, d.columns),
            )
        )
    return compared_rows(
        [
            Check(rule, rule_source(layer, rule, d.params), hand, ref, arguments)
            for rule, hand, ref, arguments in checks
        ],
        (MissingRule,),
        lambda missing: f"{missing}: derivatives run the network one example at a time",
    )


def _cache_of(layer: Any, params: Any, x: jax.Array) -> Any:
    return call_forward(layer, params, x)[1]


def _per_example_references(layer: Any, d: _Draws) -> tuple:
    """The per-example rule as the walk runs it, and the autodiff references of the per-example rows."""

    def per_example(p, inputs, cotangent):
        grads, dx = PER_EXAMPLE_BACKWARD.run(layer, p, _cache_of(layer, p, inputs), cotangent)
        return (grads, dx) if d.floating_input else grads

    def per_example_ref(p, inputs, cotangent):
        grads, dx = reference.layer_per_example_vjp(layer, p, inputs, cotangent)
        return (grads, dx) if d.floating_input else grads

    def sq_norms_ref(p, inputs, cotangent):
        if not has_params(p):
            return jnp.zeros(inputs.shape[0], cotangent.dtype)
        per = reference.layer_per_example_vjp(layer, p, inputs, cotangent)[0]
        return batch_sq_norms(per, inputs.shape[0], cotangent.dtype)

    def ntk_ref(p, a, b, d1, d2):
        if not has_params(p):
            return jnp.zeros((a.shape[0], b.shape[0]), d1.dtype)
        return reference.layer_ntk_share(layer, p, a, b, d1, d2)

    def diag_ggn_ref(p, inputs, S, each_example):
        if not has_params(p):
            return ()
        per = jax.vmap(lambda s: reference.layer_per_example_vjp(layer, p, inputs, s)[0])(S)
        squares = jax.tree_util.tree_map(lambda g: jnp.sum(g * g, axis=0), per)
        return squares if each_example else jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), squares)

    return per_example, per_example_ref, sq_norms_ref, ntk_ref, diag_ggn_ref
