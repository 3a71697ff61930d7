"""``compare_jvp``: the hand-derived Jacobian-vector product against ``jax.jvp``, whole and unit by unit."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mnet.checking.agreement import (
    FINITE_DIFFERENCE_TOLERANCE,
    Agreement,
    largest_entry,
    tolerance,
)
from mnet.checking.gradient_report import GradientReport, LayerRow, LeafRow
from mnet.checking.reference import layer_jvp
from mnet.checking.units import (
    input_tangents,
    jitted_forward,
    position_text,
    static_layer,
    unit_activations,
    unwrap,
)
from mnet.core.protocol import Array, LayerProtocol, Params
from mnet.core.tangent import tangent_walk
from mnet.quantities.tangent import input_tangent, jvp

Layer = LayerProtocol


@functools.partial(jax.jit, static_argnums=0)
def _tangent_and_jvp(layer, params: Params, cache, x: Array, dparams: Params, dx: Array | None):
    """One layer's hand tangent and ``jax.jvp`` of its ``apply``, compiled together."""
    layer = unwrap(layer)
    mine = tangent_walk(layer, params, cache, dparams, dx)[0]
    reference = layer_jvp(layer, params, x, dparams, dx)
    return (jnp.zeros_like(reference) if mine is None else mine), reference


def _layer_tangent_rows(net: Layer, params: Params, x: Array, dparams: Params, dx: Array | None) -> tuple:
    """Every unit's tangent rule against ``jax.jvp`` of its ``apply`` at its actual input, along the tangents that
    reach it (autodiff's)."""
    units = unit_activations(net, params, x)
    rows = []
    for unit, (unit_dparams, tangent) in zip(units, input_tangents(net, params, x, dparams, dx, units)):
        _, cache = jitted_forward(static_layer(unit.layer), unit.params, unit.x)
        mine, ref = _tangent_and_jvp(static_layer(unit.layer), unit.params, cache, unit.x, unit_dparams, tangent)
        parts = {"dy": Agreement.of(mine, ref, tolerance(ref.dtype), largest_entry(ref))}
        rows.append(LayerRow(position_text(unit.position), repr(unit.layer), parts))
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
