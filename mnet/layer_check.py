"""``check_layer``: one call that checks every rule a layer has against JAX autodiff, for users writing their own.

In float64 (JAX x64, switched on for the check alone), at random parameters and inputs, each rule is compared with
its reference from :mod:`mnet.reference`:

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
``tangent``                ``jax.jvp`` of the layer's output along random parameter and input tangents
``backward_tangent``       ``jax.jvp`` of ``jax.vjp``: the backward pass differentiated along the same tangents
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

from mnet import reference
from mnet.check import Agreement, largest_entry, tolerance
from mnet.errors import LayerError
from mnet.layers.base import (
    DIAG_GGN,
    NTK,
    PER_EXAMPLE_BACKWARD,
    PER_EXAMPLE_DIAG_GGN,
    PER_EXAMPLE_SQ_NORMS,
    LayerProtocol,
    MissingRule,
    Shape,
    batch_sq_norms,
    call_forward,
    has_params,
    init_layer,
    is_stateful,
    is_stochastic,
    own_rule,
    require_layer,
    tangent_walk,
    walk,
)
from mnet.layers.r_operator import HESSIAN_VECTOR
from mnet.layers.state import init_state


@dataclass(frozen=True)
class RuleRow:
    """One rule: where it comes from (``own``, ``default``, ``walk``, or ``absent``), and how it agrees with
    autodiff (the worst leaf)."""

    rule: str
    source: str
    agreement: Agreement | None = None
    worst: str = ""
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.agreement is None or self.agreement.ok


@dataclass(frozen=True)
class LayerReport:
    """The outcome of :func:`check_layer`: ``ok``, one :class:`RuleRow` per rule, ``str`` a table,
    ``to_dict()`` plain data."""

    layer: str
    input_shape: tuple[int, ...]
    batch: int
    rows: tuple[RuleRow, ...]

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def wrong(self) -> list[str]:
        """The names of the rules that disagree with autodiff."""
        return [row.rule for row in self.rows if not row.ok]

    def __getitem__(self, rule: str) -> RuleRow:
        return next(row for row in self.rows if row.rule == rule)

    def to_dict(self) -> dict:
        def agreement(a: Agreement | None):
            return None if a is None else {**a.__dict__, "ok": a.ok}

        return {
            "ok": self.ok,
            "layer": self.layer,
            "input_shape": list(self.input_shape),
            "batch": self.batch,
            "wrong": self.wrong,
            "rules": [
                {
                    "rule": r.rule,
                    "source": r.source,
                    "ok": r.ok,
                    "worst": r.worst,
                    "note": r.note,
                    "agreement": agreement(r.agreement),
                }
                for r in self.rows
            ],
        }

    def __str__(self) -> str:
        table = [["rule", "source", "max rel err", "worst leaf", ""]]
        for row in self.rows:
            error = "" if row.agreement is None else f"{row.agreement.max_rel_error:.2e}"
            table.append([row.rule, row.source, error, row.worst, "ok" if row.ok else "MISMATCH"])
            if row.note:
                table[-1][-1] += f" ({row.note})" if row.ok else f": {row.note}"
        widths = [max(len(line[i]) for line in table) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(line[:4], widths)) + "  " + line[4] for line in table]
        lines.insert(1, "-" * len(lines[0]))
        verdict = "every rule agrees with autodiff" if self.ok else f"DISAGREES with autodiff: {', '.join(self.wrong)}"
        return "\n".join(
            [
                f"check_layer {self.layer}, example shape {self.input_shape}, batch {self.batch}, float64",
                *lines,
                verdict,
            ]
        )


def _compare(rule: str, source: str, mine: Any, ref: Any) -> RuleRow:
    """The worst floating leaf of ``mine`` against ``ref``, each relative to its own largest entry or to the whole
    reference's (for leaves that are zero in exact arithmetic, as :class:`mnet.check.Agreement` explains)."""
    scale = largest_entry(ref)
    mine_leaves, ref_leaves = jax.tree_util.tree_leaves_with_path(mine), jax.tree_util.tree_leaves(ref)
    if len(mine_leaves) != len(ref_leaves):
        structures = f"{jax.tree_util.tree_structure(mine)} vs {jax.tree_util.tree_structure(ref)}"
        return RuleRow(rule, source, Agreement.of(np.nan, 0.0, 0.0), note=f"structure differs: {structures}")
    worst, worst_path = None, ""
    for (path, a), b in zip(mine_leaves, ref_leaves):
        if getattr(b, "dtype", None) == jax.dtypes.float0:
            continue
        if np.shape(a) != np.shape(b):
            return RuleRow(
                rule,
                source,
                Agreement.of(np.nan, 0.0, 0.0),
                jax.tree_util.keystr(path),
                f"shape {np.shape(a)} vs reference {np.shape(b)}",
            )
        agreement = Agreement.of(a, b, tolerance(jnp.float64), scale)
        if worst is None or (not agreement.ok, agreement.max_rel_error) > (not worst.ok, worst.max_rel_error):
            worst, worst_path = agreement, jax.tree_util.keystr(path) or "(value)"
    return RuleRow(rule, source, worst, worst_path)


def _source(layer: Any, rule: str, params: Any) -> str:
    if callable(getattr(layer, "walk", None)):
        return "walk"
    if own_rule(layer, rule) is not None:
        return "own"
    return "default" if not has_params(params) else "absent"


def _random_input(layer: Any, shape: tuple[int, ...], rng: np.random.Generator) -> jax.Array:
    vocab = getattr(layer, "input_vocab", None)
    if vocab is not None:
        return jnp.asarray(rng.integers(0, vocab, shape), jnp.int32)
    return jnp.asarray(rng.normal(size=shape), jnp.float64)


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

    rows = []
    for rule, hand, ref, arguments in (
        (
            "tangent",
            hand_tangent,
            lambda p, inputs, dp, t: reference.layer_jvp(layer, p, inputs, dp, t),
            (params, x, dparams, dx),
        ),
        ("backward_tangent", hand_backward_tangent, ref_backward_tangent, (params, x, dparams, dx, dy, dy_tangent)),
    ):
        source = _source(layer, rule, params)
        try:
            mine = jax.jit(hand)(*arguments)
        except LayerError as missing:
            rows.append(RuleRow(rule, "absent", note=str(missing)))
            continue
        rows.append(_compare(rule, "default" if source == "absent" else source, mine, jax.jit(ref)(*arguments)))
    return rows


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
        return replace(evaluating, rows=evaluating.rows + rows)
    return _check_rules(layer, input_shape, batch, seed)


#: The rules of a stateful layer that training mode has (the per-example ones refuse it).
TRAINING_RULES = ("backward", "tangent", "backward_tangent")


def _check_rules(
    layer: Any, input_shape: tuple[int, ...], batch: int, seed: int, stateless: bool = False
) -> LayerReport:
    """Every rule of ``layer`` against autodiff; ``stateless`` leaves out the per-example rows."""
    rng = np.random.default_rng(seed)
    output_shape, params = init_layer(layer, jax.random.key(seed), input_shape, jnp.float64)
    # Moved off their initial values, so that a zero-initialised bias cannot hide a wrong bias rule.
    params = jax.tree_util.tree_map(
        lambda p: (
            p + 0.1 * jnp.asarray(rng.normal(size=np.shape(p)), p.dtype)
            if jnp.issubdtype(jnp.asarray(p).dtype, jnp.floating)
            else p
        ),
        params,
    )
    x = _random_input(layer, (batch,) + input_shape, rng)
    x2 = _random_input(layer, (batch + 1,) + input_shape, rng)
    y, _ = jax.jit(lambda p, inputs: call_forward(layer, p, inputs))(params, x)
    dy = jnp.asarray(rng.normal(size=y.shape), y.dtype)
    dys1 = jnp.asarray(rng.normal(size=(2,) + y.shape), y.dtype)
    dys2 = jnp.asarray(rng.normal(size=(2, batch + 1) + y.shape[1:]), y.dtype)
    floating_input = jnp.issubdtype(x.dtype, jnp.floating)

    shapes_agree = tuple(output_shape) == tuple(y.shape[1:])
    rows = [
        RuleRow(
            "init",
            "own",
            Agreement.of(0.0 if shapes_agree else np.nan, 0.0, 0.0),
            note="" if shapes_agree else f"init reports {tuple(output_shape)}, forward gives {tuple(y.shape[1:])}",
        )
    ]
    if callable(getattr(layer, "apply", None)):
        rows.append(_compare("apply", "own", jax.jit(layer.apply)(params, x), y))

    def hand_backward(p, inputs, cotangent, key=None, train=False):
        grads, dx = layer.backward(p, call_forward(layer, p, inputs, key, train)[1], cotangent)
        return (grads, dx) if floating_input else grads

    def ref_backward(p, inputs, cotangent, key=None, train=False):
        grads, dx = reference.layer_vjp(layer, p, inputs, cotangent, key=key, train=train)
        return (grads, dx) if floating_input else grads

    rows.append(
        _compare(
            "backward",
            "walk" if callable(getattr(layer, "walk", None)) else "own",
            jax.jit(hand_backward)(params, x, dy),
            jax.jit(ref_backward)(params, x, dy),
        )
    )
    if is_stochastic(layer):
        key = jax.random.key(seed + 1)
        mine = jax.jit(hand_backward, static_argnames="train")(params, x, dy, key, True)
        ref = jax.jit(ref_backward, static_argnames="train")(params, x, dy, key, True)
        rows.append(_compare("backward[train]", "own", mine, ref))

    def per_example(p, inputs, cotangent):
        grads, dx = PER_EXAMPLE_BACKWARD.run(layer, p, call_forward(layer, p, inputs)[1], cotangent)
        return (grads, dx) if floating_input else grads

    def per_example_ref(p, inputs, cotangent):
        grads, dx = reference.layer_per_example_vjp(layer, p, inputs, cotangent)
        return (grads, dx) if floating_input else grads

    checks: list[tuple[str, Callable, Callable, tuple]] = [
        ("per_example_backward", per_example, per_example_ref, (params, x, dy)),
        (
            "per_example_sq_norms",
            lambda p, inputs, cotangent: PER_EXAMPLE_SQ_NORMS.run(
                layer, p, call_forward(layer, p, inputs)[1], cotangent
            )[0],
            lambda p, inputs, cotangent: (
                batch_sq_norms(
                    reference.layer_per_example_vjp(layer, p, inputs, cotangent)[0], inputs.shape[0], cotangent.dtype
                )
                if has_params(p)
                else jnp.zeros(inputs.shape[0], cotangent.dtype)
            ),
            (params, x, dy),
        ),
        (
            "ntk_contribution",
            lambda p, a, b, d1, d2: NTK.run_pair(
                layer, p, (call_forward(layer, p, a)[1], call_forward(layer, p, b)[1]), (d1, d2)
            ),
            lambda p, a, b, d1, d2: (
                reference.layer_ntk_share(layer, p, a, b, d1, d2)
                if has_params(p)
                else jnp.zeros((a.shape[0], b.shape[0]), d1.dtype)
            ),
            (params, x, x2, dys1, dys2),
        ),
    ]
    columns = jnp.asarray(rng.normal(size=(2,) + y.shape), y.dtype)  # two columns of a loss-Hessian square root

    def diag_ggn_ref(p, inputs, S, each_example):
        if not has_params(p):
            return ()
        per = jax.vmap(lambda s: reference.layer_per_example_vjp(layer, p, inputs, s)[0])(S)
        squares = jax.tree_util.tree_map(lambda g: jnp.sum(g * g, axis=0), per)
        return squares if each_example else jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), squares)

    for quantity, each_example in ((PER_EXAMPLE_DIAG_GGN, True), (DIAG_GGN, False)):
        checks.append(
            (
                quantity.rule,
                lambda p, inputs, S, q=quantity: q.run(layer, p, call_forward(layer, p, inputs)[1], S)[0],
                lambda p, inputs, S, e=each_example: diag_ggn_ref(p, inputs, S, e),
                (params, x, columns),
            )
        )
    for rule, hand, ref, arguments in [] if stateless else checks:
        source = _source(layer, rule, params)
        try:
            mine = jax.jit(hand)(*arguments)
        except MissingRule as missing:
            rows.append(RuleRow(rule, "absent", note=f"{missing}: derivatives run the network one example at a time"))
            continue
        rows.append(_compare(rule, source, mine, jax.jit(ref)(*arguments)))
    rows.extend(_forward_mode_rows(layer, params, x, dy, rng))
    return LayerReport(repr(layer), input_shape, batch, tuple(rows))
