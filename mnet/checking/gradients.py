"""The referee: JAX's automatic differentiation and finite differences, against the hand-derived path.

The autodiff side of every comparison comes from :mod:`mnet.checking.reference`; with :mod:`mnet.bench` (where autodiff is
a benchmark contender) and :mod:`mnet.checking.layer_check`, these are the only library modules that call
``jax.grad``/``jax.vjp``: everything else in mnet is hand-derived.

Three comparisons, from coarse to fine:

* :func:`compare_gradients`: the hand-derived gradient of a loss against ``jax.value_and_grad``, leaf by leaf,
  and optionally against central finite differences computed in float64;
* its layer-by-layer part: each layer's ``backward`` against ``jax.vjp`` of its ``apply`` at the activations
  and cotangents of the actual input, so a wrong rule is pinned to one layer and one leaf;
* :func:`compare_cost`: the compiled hand-derived and autodiff gradient functions, by XLA's cost analysis and
  by measured time, side by side in one process.

Tolerances are relative to the reference leaf's largest entry (:func:`relative_error`) and scale with the
dtype's machine epsilon (:func:`tolerance`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from mnet.checking.agreement import (
    FINITE_DIFFERENCE_TOLERANCE,
    FULL_DIFFERENCE_SIZE,
    RANDOM_DIRECTIONS,
    SAMPLED_COORDINATES,
    Agreement,
    largest_entry,
    tolerance,
)
from mnet.checking.reference import autodiff_value_and_grad, layer_jvp, layer_vjp
from mnet.checking.units import input_tangents, output_cotangents, unit_activations
from mnet.core.protocol import Array, LayerProtocol, Params
from mnet.core.tangent import tangent_walk
from mnet.losses import Loss
from mnet.quantities.gradient import value_and_grad
from mnet.quantities.tangent import input_tangent, jvp

Layer = LayerProtocol


@dataclass(frozen=True)
class LeafRow:
    """One parameter leaf: hand-derived vs autodiff, and each vs finite differences when computed."""

    path: str
    shape: tuple[int, ...]
    autodiff: Agreement
    finite_differences: Agreement | None = None
    autodiff_vs_finite_differences: Agreement | None = None
    differenced: str = ""

    @property
    def ok(self) -> bool:
        checks = (self.autodiff, self.finite_differences, self.autodiff_vs_finite_differences)
        return all(check.ok for check in checks if check is not None)


@dataclass(frozen=True)
class LayerRow:
    """One layer's ``backward`` against ``jax.vjp`` of its ``apply`` at the actual activations and cotangent."""

    position: str
    layer: str
    parts: dict[str, Agreement]

    @property
    def ok(self) -> bool:
        return all(part.ok for part in self.parts.values())

    @property
    def wrong_parts(self) -> list[str]:
        return [name for name, part in self.parts.items() if not part.ok]


@dataclass(frozen=True)
class GradientReport:
    """The outcome of :func:`compare_gradients`.

    Attributes:
        rows: one :class:`LeafRow` per parameter leaf, named by its path (``[2]['W']``).
        layers: one :class:`LayerRow` per unit (serial, residual and parallel blocks are walked into).
        value, reference_value: the loss by the hand-derived path and by autodiff.
        dtype: the dtype of the parameters.
        ok: every row and every layer within tolerance.
    """

    rows: tuple[LeafRow, ...]
    layers: tuple[LayerRow, ...]
    value: float
    reference_value: float
    dtype: str
    finite_differences: bool = False
    notes: tuple[str, ...] = field(default=())
    kind: str = "gradient"  # "tangent" for compare_jvp: value is then the output tangent's norm

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows) and all(layer.ok for layer in self.layers)

    @property
    def first_wrong_layer(self) -> LayerRow | None:
        """The first layer (in forward order) whose own rule disagrees with ``jax.vjp``, or None."""
        return next((layer for layer in self.layers if not layer.ok), None)

    def to_dict(self) -> dict:
        """Plain data (JSON-serialisable): every row and layer with its numbers and verdicts."""

        def agreement(a: Agreement | None):
            return None if a is None else {**asdict(a), "ok": a.ok}

        return {
            "ok": self.ok,
            "dtype": self.dtype,
            "value": self.value,
            "reference_value": self.reference_value,
            "finite_differences": self.finite_differences,
            "kind": self.kind,
            "leaves": [
                {
                    "path": row.path,
                    "shape": list(row.shape),
                    "ok": row.ok,
                    "autodiff": agreement(row.autodiff),
                    "finite_differences": agreement(row.finite_differences),
                    "autodiff_vs_finite_differences": agreement(row.autodiff_vs_finite_differences),
                    "differenced": row.differenced,
                }
                for row in self.rows
            ],
            "layers": [
                {
                    "position": layer.position,
                    "layer": layer.layer,
                    "ok": layer.ok,
                    "parts": {name: agreement(part) for name, part in layer.parts.items()},
                }
                for layer in self.layers
            ],
            "first_wrong_layer": None if self.first_wrong_layer is None else self.first_wrong_layer.position,
            "notes": list(self.notes),
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        header = ["leaf", "shape", "max abs err", "max rel err", "cosine", "|hand|", "|autodiff|"]
        if self.finite_differences:
            header += ["rel err vs FD", "autodiff vs FD"]
        header.append("")
        table = [header]
        for row in self.rows:
            a = row.autodiff
            line = [
                row.path,
                "x".join(map(str, row.shape)) or "()",
                f"{a.max_abs_error:.2e}",
                f"{a.max_rel_error:.2e}",
                f"{a.cosine:.9f}",
                f"{a.norm:.4e}",
                f"{a.reference_norm:.4e}",
            ]
            if self.finite_differences:
                assert row.finite_differences and row.autodiff_vs_finite_differences
                line += [
                    f"{row.finite_differences.max_rel_error:.2e}",
                    f"{row.autodiff_vs_finite_differences.max_rel_error:.2e}",
                ]
            line.append("ok" if row.ok else "MISMATCH")
            table.append(line)
        widths = [max(len(line[i]) for line in table) for i in range(len(header))]
        lines = [
            "  ".join(
                cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))
            ).rstrip()
            for line in table
        ]
        lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
        first = self.rows[0].autodiff.tolerance if self.rows else tolerance(self.dtype)
        gradient = self.kind == "gradient"
        summary = [
            ("loss" if gradient else "|output tangent|")
            + f" {self.value:.10g} (autodiff {self.reference_value:.10g}); dtype {self.dtype}; "
            f"tolerance {first:.1e} relative to each leaf's largest entry"
            + (
                f", {FINITE_DIFFERENCE_TOLERANCE:.0e} against float64 finite differences"
                if self.finite_differences
                else ""
            )
        ]
        wrong = [layer for layer in self.layers if not layer.ok]
        for layer in wrong:
            summary.append(
                f"layer {layer.position} {layer.layer}: its "
                + ("backward disagrees with jax.vjp" if gradient else "tangent disagrees with jax.jvp")
                + " in "
                + ", ".join(f"{name} (rel err {layer.parts[name].max_rel_error:.2e})" for name in layer.wrong_parts)
            )
        summary.extend(self.notes)
        plural = "gradients" if gradient else "tangents"
        summary.append(
            f"{plural} agree"
            if self.ok
            else (
                f"{plural} DISAGREE; the first wrong layer is {wrong[0].position} {wrong[0].layer}"
                if wrong
                else f"{plural} DISAGREE"
            )
        )
        return "\n".join(lines + [""] + summary)


class _ByIdentity:
    """A layer that cannot be hashed (a user's dataclass without ``frozen=True``), made a static argument of
    ``jax.jit`` by identity."""

    def __init__(self, layer: Layer):
        self.layer = layer


def _static(layer: Layer):
    try:
        hash(layer)
    except TypeError:
        return _ByIdentity(layer)
    return layer


def _unwrap(static) -> Layer:
    return static.layer if isinstance(static, _ByIdentity) else static


@functools.partial(jax.jit, static_argnums=0)
def _jitted_forward(layer, params: Params, x: Array):
    return _unwrap(layer).forward(params, x)


@functools.partial(jax.jit, static_argnums=0)
def _backward_and_vjp(layer, params: Params, cache, x: Array, dy: Array):
    """One layer's hand backward and ``jax.vjp`` of its ``apply``, compiled together (eager JAX would compile
    every primitive on its own, which is most of the cost for small layers)."""
    layer = _unwrap(layer)
    return layer.backward(params, cache, dy), layer_vjp(layer, params, x, dy)


def _layer_rows(net: Layer, loss: Loss, params: Params, x: Array, targets: Array) -> tuple[LayerRow, ...]:
    """At every unit of the network (:mod:`mnet.checking.units`: inside serial, residual and parallel blocks alike),
    its ``backward`` against ``jax.vjp`` of its ``apply`` at its actual input and parameters and the cotangent that
    reaches its output (autodiff's), so that a wrong rule is pinned to the one unit that has it."""
    units = unit_activations(net, params, x)
    cotangents = output_cotangents(net, loss, params, x, targets, units)
    rows = []
    for unit, cotangent in zip(units, cotangents):
        _, cache = _jitted_forward(_static(unit.layer), unit.params, unit.x)
        (dparams, dx), (dparams_ref, dx_ref) = _backward_and_vjp(
            _static(unit.layer), unit.params, cache, unit.x, cotangent
        )
        tol = tolerance(cotangent.dtype)
        scale = largest_entry((dparams_ref, dx_ref))
        parts = {
            f"d{jax.tree_util.keystr(path) or 'params'}": Agreement.of(mine, ref, tol, scale)
            for (path, mine), ref in zip(
                jax.tree_util.tree_leaves_with_path(dparams), jax.tree_util.tree_leaves(dparams_ref)
            )
        }
        if jnp.issubdtype(jnp.asarray(unit.x).dtype, jnp.inexact):  # integer ids (Embedding) have no gradient
            parts["dx"] = Agreement.of(dx, dx_ref, tol, scale)
        rows.append(LayerRow(_position(unit.position), repr(unit.layer), parts))
    return tuple(rows)


def _position(position: tuple[int, ...]) -> str:
    return "".join(f"[{i}]" for i in position) or "[]"


def _finite_difference_rows(net, loss, params, x, targets, grads, grads_ref, seed):
    """Central differences of the loss in float64, per leaf: every coordinate of a small leaf; a seeded sample
    of coordinates plus random unit directions for a large one. Returns (hand vs FD, autodiff vs FD, label)."""
    rng = np.random.default_rng(seed)
    with jax.enable_x64(True):
        params64 = jax.tree_util.tree_map(lambda p: jnp.asarray(np.asarray(p, np.float64)), params)
        x64 = (
            jnp.asarray(np.asarray(x, np.float64))
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
            else jnp.asarray(x)
        )
        targets64 = (
            jnp.asarray(np.asarray(targets, np.float64))
            if jnp.issubdtype(jnp.asarray(targets).dtype, jnp.floating)
            else jnp.asarray(targets)
        )
        leaves, treedef = jax.tree_util.tree_flatten(params64)
        scale = largest_entry(grads_ref)
        step = float(np.finfo(np.float64).eps) ** (1 / 3)
        results = []
        for index, (leaf, hand, ref) in enumerate(
            zip(leaves, jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref))
        ):
            size = leaf.size
            if size <= FULL_DIFFERENCE_SIZE:
                directions = np.eye(size)
                label = f"all {size}"
            else:
                picked = rng.choice(size, SAMPLED_COORDINATES, replace=False)
                random = rng.normal(size=(RANDOM_DIRECTIONS, size))
                directions = np.concatenate(
                    [np.eye(size)[picked], random / np.linalg.norm(random, axis=1, keepdims=True)]
                )
                label = f"{SAMPLED_COORDINATES} of {size} + {RANDOM_DIRECTIONS} dirs"
            # One step scaled to the leaf's magnitude, the same for every direction so the batch stays one call.
            h = step * max(1.0, float(jnp.max(jnp.abs(leaf))))

            def loss_at(flat_leaf, index=index, shape=leaf.shape):
                moved = list(leaves)
                moved[index] = flat_leaf.reshape(shape)
                return loss.value(net.forward(jax.tree_util.tree_unflatten(treedef, moved), x64)[0], targets64)

            evaluate = jax.jit(jax.vmap(loss_at))
            base = leaf.ravel()
            d = jnp.asarray(directions)
            slopes = np.asarray((evaluate(base + h * d) - evaluate(base - h * d)) / (2 * h))
            hand_dirs = directions @ np.asarray(hand, np.float64).ravel()
            ref_dirs = directions @ np.asarray(ref, np.float64).ravel()
            tol = max(FINITE_DIFFERENCE_TOLERANCE, tolerance(jnp.asarray(hand).dtype))
            results.append(
                (Agreement.of(hand_dirs, slopes, tol, scale), Agreement.of(ref_dirs, slopes, tol, scale), label)
            )
    return results


def compare_gradients(
    net: Layer,
    loss: Loss,
    params: Params,
    x: Array,
    targets: Array,
    *,
    finite_differences: bool = False,
    layer_by_layer: bool = True,
    seed: int = 0,
) -> GradientReport:
    """Compare the hand-derived gradient with ``jax.grad`` (and with finite differences when asked).

    Arguments:
        net, loss: the network and loss whose gradient is checked.
        params, x, targets: where it is checked; comparisons run in the dtype of ``params``.
        finite_differences: also compare both gradients against central differences computed in float64
            (every coordinate of leaves up to 64 entries; for larger leaves 24 seeded coordinates and 4 random
            unit directions), tolerance :data:`FINITE_DIFFERENCE_TOLERANCE`.
        layer_by_layer: also check every layer's ``backward`` against ``jax.vjp`` of its ``apply`` at the
            actual activations, which names the layer where a disagreement starts.
        seed: seeds the sampled coordinates and directions of the finite differences.

    Returns:
        A :class:`GradientReport`; ``report.ok`` is the verdict, ``str(report)`` a table, ``report.to_dict()``
        plain data.
    """
    value, grads = jax.jit(value_and_grad(net, loss))(params, x, targets)
    reference_value, grads_ref = jax.jit(autodiff_value_and_grad(net, loss))(params, x, targets)
    dtype = (
        str(jax.tree_util.tree_leaves(grads)[0].dtype)
        if jax.tree_util.tree_leaves(grads)
        else str(jnp.asarray(x).dtype)
    )
    differences = (
        _finite_difference_rows(net, loss, params, x, targets, grads, grads_ref, seed) if finite_differences else None
    )
    rows = []
    scale = largest_entry(grads_ref)
    for index, ((path, hand), ref) in enumerate(
        zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(grads_ref))
    ):
        agreement = Agreement.of(hand, ref, tolerance(hand.dtype), scale)
        if differences is None:
            rows.append(LeafRow(jax.tree_util.keystr(path), tuple(hand.shape), agreement))
        else:
            fd_hand, fd_ref, label = differences[index]
            rows.append(LeafRow(jax.tree_util.keystr(path), tuple(hand.shape), agreement, fd_hand, fd_ref, label))
    notes: tuple[str, ...] = ()
    if not np.isclose(float(value), float(reference_value), rtol=tolerance(dtype), atol=0):
        notes = (f"the loss values differ: {float(value)!r} vs {float(reference_value)!r}",)
    return GradientReport(
        rows=tuple(rows),
        layers=_layer_rows(net, loss, params, x, targets) if layer_by_layer else (),
        value=float(value),
        reference_value=float(reference_value),
        dtype=dtype,
        finite_differences=finite_differences,
        notes=notes,
    )


@functools.partial(jax.jit, static_argnums=0)
def _tangent_and_jvp(layer, params: Params, cache, x: Array, dparams: Params, dx: Array | None):
    """One layer's hand tangent and ``jax.jvp`` of its ``apply``, compiled together."""
    layer = _unwrap(layer)
    mine = tangent_walk(layer, params, cache, dparams, dx)[0]
    reference = layer_jvp(layer, params, x, dparams, dx)
    return (jnp.zeros_like(reference) if mine is None else mine), reference


def _layer_tangent_rows(net: Layer, params: Params, x: Array, dparams: Params, dx: Array | None) -> tuple:
    """Every unit's tangent rule against ``jax.jvp`` of its ``apply`` at its actual input, along the tangents that
    reach it (autodiff's)."""
    units = unit_activations(net, params, x)
    rows = []
    for unit, (unit_dparams, tangent) in zip(units, input_tangents(net, params, x, dparams, dx, units)):
        _, cache = _jitted_forward(_static(unit.layer), unit.params, unit.x)
        mine, ref = _tangent_and_jvp(_static(unit.layer), unit.params, cache, unit.x, unit_dparams, tangent)
        parts = {"dy": Agreement.of(mine, ref, tolerance(ref.dtype), largest_entry(ref))}
        rows.append(LayerRow(_position(unit.position), repr(unit.layer), parts))
    return tuple(rows)


def compare_jvp(
    net: Layer,
    params: Params,
    x: Array,
    dparams: Params,
    dx: Array | None = None,
    *,
    finite_differences: bool = False,
    layer_by_layer: bool = True,
) -> GradientReport:
    """Compare the hand-derived Jacobian-vector product (:func:`mnet.jvp`) with ``jax.jvp`` (and with central
    finite differences along the same direction, in float64, when asked): the forward-mode twin of
    :func:`compare_gradients`.

    Arguments:
        net: the network (or a single layer) whose tangent rules are checked.
        params, x: where; ``dparams`` (like params) and ``dx`` (like ``x``, or None for a zero input tangent) the
            direction.
        finite_differences: also compare both against ``(f(p + h v) - f(p - h v)) / 2h`` in float64.
        layer_by_layer: also check every layer's ``tangent`` against ``jax.jvp`` of its ``apply`` at the actual
            activations and incoming tangents, which names the layer where a disagreement starts.

    Returns:
        A :class:`GradientReport` with ``kind="tangent"``: one row, the output tangent; ``value`` and
        ``reference_value`` are the two output tangents' norms.
    """
    dx = input_tangent(x, dx)
    _, dy = jax.jit(jvp(net))(params, x, dparams, dx)
    dy_ref = jax.jit(lambda p, inputs, dp, t: layer_jvp(net, p, inputs, dp, t))(params, x, dparams, dx)
    scale = largest_entry(dy_ref)
    agreement = Agreement.of(dy, dy_ref, tolerance(dy.dtype), scale)
    row = LeafRow("output tangent", tuple(dy.shape), agreement)
    if finite_differences:
        with jax.enable_x64(True):
            as64 = functools.partial(jax.tree_util.tree_map, lambda a: jnp.asarray(np.asarray(a, np.float64)))
            p64, dp64 = as64(params), as64(dparams)
            x64 = as64(x) if dx is not None else jnp.asarray(x)
            dx64 = None if dx is None else as64(dx)
            h = float(np.finfo(np.float64).eps) ** (1 / 3)

            def moved(sign: float) -> Array:
                p = jax.tree_util.tree_map(lambda a, d: a + sign * h * d, p64, dp64)
                return net.forward(p, x64 if dx64 is None else x64 + sign * h * dx64)[0]

            at = jax.jit(moved)  # one compilation for both signs
            slopes = np.asarray((at(1.0) - at(-1.0)) / (2 * h))
        tol = max(FINITE_DIFFERENCE_TOLERANCE, tolerance(dy.dtype))
        row = LeafRow(
            "output tangent",
            tuple(dy.shape),
            agreement,
            Agreement.of(np.asarray(dy, np.float64), slopes, tol, scale),
            Agreement.of(np.asarray(dy_ref, np.float64), slopes, tol, scale),
            "the direction",
        )
    return GradientReport(
        rows=(row,),
        layers=_layer_tangent_rows(net, params, x, dparams, dx) if layer_by_layer else (),
        value=float(jnp.linalg.norm(dy)),
        reference_value=float(jnp.linalg.norm(dy_ref)),
        dtype=str(dy.dtype),
        finite_differences=finite_differences,
        kind="tangent",
    )
