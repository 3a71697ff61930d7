"""Every unit of a network with its actual input: what the layer-by-layer checks compare at.

The backward walk's caches do not hold every layer's input (an activation keeps its mask or output), so the checks
watch the forward pass instead: while :func:`mnet.core.protocol.intercepting` is active, every layer called through
``call_forward`` passes through a :class:`UnitRecorder`, which opens the combinators (serial, residual, parallel)
and records every other layer (a unit: a dense layer, an activation, a convolution or attention layer as a whole, a
user's layer) with its position, its parameters and its input. Its positions are the layer tree's: ``[2]`` the
third layer of a serial network, ``[1][0]`` the block of a residual at position 1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from mnet.core.layer import Layer
from mnet.core.protocol import Array, Params, call_forward, intercepting
from mnet.core.walk import Composite, Compound
from mnet.losses import with_mask


@dataclass
class Recorded:
    """One unit as the forward pass met it."""

    position: tuple[int, ...]
    layer: Any
    params: Params
    x: Array
    y: Array
    mask: Array | None = None


class UnitRecorder:
    """The interceptor: opens combinators, records units; adds ``perturbations[k]`` to the ``k``-th unit's output
    when given (so that autodiff gives the gradient reaching every unit's output)."""

    def __init__(self, perturbations: list[Array] | None = None):
        self.perturbations = perturbations
        self.found: list[Recorded] = []
        self._path: list[int] = []
        self._children = [0]

    def __call__(
        self, layer: Any, params: Params, x: Array, forward: Callable[[], tuple[Array, Any]], mask: Array | None
    ):
        index = self._children[-1]
        self._children[-1] += 1
        if isinstance(layer, Composite) and not isinstance(layer, Compound):
            self._path.append(index)
            self._children.append(0)
            try:
                return forward()
            finally:
                self._path.pop()
                self._children.pop()
        with intercepting(None):  # a unit is checked whole: its insides are its own business
            y, cache = forward()
        if self.perturbations is not None:
            y = y + self.perturbations[len(self.found)]
        position = tuple(self._path[1:]) + ((index,) if self._path else ())
        self.found.append(Recorded(position, layer, params, x, y, mask))
        return y, cache


def recorded_forward(
    net: Any, params: Params, x: Array, perturbations: list[Array] | None = None, mask: Array | None = None
):
    """``(outputs, [Recorded])``: the network's forward pass (with its padding ``mask``) with every unit recorded."""
    recorder = UnitRecorder(perturbations)
    with intercepting(recorder):
        outputs = call_forward(net, params, x, mask=mask)[0]
    return outputs, recorder.found


def unit_activations(net: Any, params: Params, x: Array, mask: Array | None = None) -> list[Recorded]:
    """Every unit with its parameters, its actual input, its output and the mask it read, computed in one compiled
    forward pass."""
    meta: list[tuple] = []

    def arrays(p: Params, inputs: Array, m: Array | None):
        _, found = recorded_forward(net, p, inputs, mask=m)
        meta[:] = [(r.position, r.layer) for r in found]
        return [(r.params, r.x, r.y, r.mask) for r in found]

    values = jax.jit(arrays)(params, x, mask)  # a closure of its own each call, so that it is traced and meta filled
    return [Recorded(position, layer, *value) for (position, layer), value in zip(meta, values)]


def output_cotangents(
    net: Any, loss: Any, params: Params, x: Array, targets: Array, units: list[Recorded], mask: Array | None = None
):
    """The gradient of the loss reaching every unit's output (``jax.grad`` of a zero added to each): the cotangent
    each unit's backward is checked with."""
    loss, targets = with_mask(loss, targets, mask)

    def objective(perturbations: list[Array]) -> Array:
        return loss.value(recorded_forward(net, params, x, perturbations, mask)[0], targets)

    return jax.jit(jax.grad(objective))([jnp.zeros_like(r.y) for r in units])


def input_tangents(net: Any, params: Params, x: Array, dparams: Params, dx: Array | None, units: list[Recorded]):
    """``[(dparams_k, dx_k)]``: the tangent of every unit's parameters and input along ``(dparams, dx)``
    (``jax.jvp`` of the recorded forward pass); ``dx_k`` None where the input does not move."""

    def inputs(p: Params, moving: Array | None):
        _, found = recorded_forward(net, p, x if moving is None else moving)
        return [(r.params, r.x) for r in found]

    if dx is None:
        tangents = jax.jit(lambda p, dp: jax.jvp(lambda q: inputs(q, None), (p,), (dp,))[1])(params, dparams)
    else:
        tangents = jax.jit(lambda p, xi, dp, t: jax.jvp(inputs, (p, xi), (dp, t))[1])(params, x, dparams, dx)
    return [
        (dp, None if not jnp.issubdtype(jnp.asarray(r.x).dtype, jnp.inexact) or _all_zero(t) else t)
        for (dp, t), r in zip(tangents, units)
    ]


def _all_zero(t: Any) -> bool:
    return getattr(t, "dtype", None) == jax.dtypes.float0


class _ByIdentity:
    """A layer that cannot be hashed (a user's dataclass without ``frozen=True``), made a static argument of
    ``jax.jit`` by identity."""

    def __init__(self, layer: Layer):
        self.layer = layer


def static_layer(layer: Layer):
    try:
        hash(layer)
    except TypeError:
        return _ByIdentity(layer)
    return layer


def unwrap(static) -> Layer:
    return static.layer if isinstance(static, _ByIdentity) else static


@functools.partial(jax.jit, static_argnums=0)
def jitted_forward(layer, params: Params, x: Array, mask: Array | None = None):
    return call_forward(unwrap(layer), params, x, mask=mask)


def position_text(position: tuple[int, ...]) -> str:
    return "".join(f"[{i}]" for i in position) or "[]"
