"""The core: what a layer is, the one walk every quantity takes down the network, the tangent walk up it, and the
state beside the params. ``README.md`` in this folder explains how the pieces fit."""

from mnet.core.layer import Layer, check_param_keys, describe, located, positive_int, shape_record
from mnet.core.protocol import (
    Array,
    Cache,
    LayerProtocol,
    Params,
    Shape,
    apply_layer,
    call_forward,
    default_float_dtype,
    has_params,
    init_layer,
    is_layer,
    is_stateful,
    is_stochastic,
    require_layer,
)
from mnet.core.state import init_state, update_state
from mnet.core.sums import add_cotangents, add_tangents, batch_sq_norms, sum_stack
from mnet.core.tangent import tangent_walk
from mnet.core.walk import BACKWARD, Composite, Compound, MissingRule, Quantity, StackedQuantity, own_rule, walk

__all__ = [
    "BACKWARD",
    "Array",
    "Cache",
    "Composite",
    "Compound",
    "Layer",
    "LayerProtocol",
    "MissingRule",
    "Params",
    "Quantity",
    "Shape",
    "StackedQuantity",
    "add_cotangents",
    "add_tangents",
    "apply_layer",
    "batch_sq_norms",
    "call_forward",
    "check_param_keys",
    "default_float_dtype",
    "describe",
    "has_params",
    "init_layer",
    "init_state",
    "is_layer",
    "is_stateful",
    "is_stochastic",
    "located",
    "own_rule",
    "positive_int",
    "require_layer",
    "sum_stack",
    "shape_record",
    "tangent_walk",
    "update_state",
    "walk",
]
