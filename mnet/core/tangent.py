"""The forward walk: tangents (forward mode) go up the network, from the input to the output, through the caches
that ``forward`` left.

A unit's rule is ``tangent(params, cache, dparams, dx) -> dy``; a composite's is ``tangent_walk(params, cache,
dparams, dx) -> (dy, record)``. The record holds, for every unit, the tangents that reached it, ``(dparams, dx)``, in
the caches' own structure: the Hessian-vector walk reads it on the way down. ``dx = None`` is a zero tangent (a
constant input: integer ids, or the data when only parameters move); a unit without parameters passes it on as
None, so no product with zeros is ever computed.
"""

from __future__ import annotations

from typing import Any

from mnet.core.protocol import Array, Cache, Params, has_params
from mnet.errors import LayerError


def missing_tangent(layer: Any) -> LayerError:
    return LayerError(
        layer,
        "has no forward-mode rule: give it a tangent(params, cache, dparams, dx) -> dy method (the Jacobian-vector "
        "product from the forward cache; dx may be None, a zero input tangent)",
    )


def tangent_walk(layer: Any, params: Params, cache: Cache, dparams: Params, dx: Array | None) -> tuple[Any, Any]:
    """Carry a tangent up through ``layer``: ``(dy, record)``, ``dy`` None where it is zero."""
    through = getattr(layer, "tangent_walk", None)
    if callable(through):
        return through(params, cache, dparams, dx)
    if dx is None and not has_params(params):
        return None, (dparams, None)
    rule = getattr(layer, "tangent", None)
    if not callable(rule):
        raise missing_tangent(layer)
    return rule(params, cache, dparams, dx), (dparams, dx)
