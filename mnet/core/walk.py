"""The walk: one traversal for every quantity that carries a cotangent-like value down the network.

A quantity is carried down in ``streams`` (one for a gradient; two for the NTK, which walks the caches of two
batches side by side): ``caches`` and ``carried`` are tuples with one entry per stream. At a layer made of layers
(one with a ``walk`` method: the combinators and composite layers) the walk goes inside; at any other layer (a
unit) the quantity applies the layer's own rule if it has one, or else its default, derived from the rules every
layer has. The walk returns a tree like the params down to each unit's entry (a unit's gradient, its per-example
gradients, its squared norms, its NTK share, ...), and the carried values at the input.

The gradient (:data:`BACKWARD`) is the walk's own quantity: a composite's ``backward`` is that walk. Every other
quantity lives in its own module of :mod:`mnet.quantities`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mnet.core.layer import Layer, describe
from mnet.core.paths import flatten_with_keys
from mnet.core.protocol import Array, Cache, Params, call_forward, has_params
from mnet.core.sums import add_cotangents, add_trees
from mnet.core.tangent import tangent_walk
from mnet.errors import LayerError


class MissingRule(NotImplementedError):
    """A unit with parameters has no rule for a quantity that cannot be derived from ``backward`` alone; the
    drivers of :mod:`mnet.quantities.per_example` then run the network one example at a time instead."""

    def __init__(self, layer: Any, rule: str):
        super().__init__(f"{layer!r} has no {rule} rule")
        self.layer, self.rule = layer, rule


def check_gradient_shapes(layer: Any, params: Params, grads: Any) -> None:
    """Refuse a ``backward`` whose gradient is not shaped like the layer's params (a user's layer, most likely): at
    trace time, so it costs nothing when the program runs, and as a :class:`LayerError` that the combinators
    locate, instead of a broadcast error far downstream or inside the optimizer."""
    if str(jax.tree_util.tree_structure(grads)) != str(jax.tree_util.tree_structure(params)):
        raise LayerError(layer, f"backward returned a gradient {describe(grads)} for params {describe(params)}")
    for (path, grad), param in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(params)):
        if jnp.shape(grad) != jnp.shape(param):
            raise LayerError(
                layer,
                f"backward returned a gradient of shape {jnp.shape(grad)} for params{jax.tree_util.keystr(path)} of "
                f"shape {jnp.shape(param)}",
            )


def own_rule(layer: Any, name: str):
    """The layer's own method ``name``, or None when it has none."""
    method = getattr(layer, name, None)
    return method if callable(method) else None


def walk(layer: Any, quantity: Quantity, params: Params, caches: tuple, carried: tuple) -> tuple[Any, tuple]:
    """Carry ``quantity`` down through ``layer``: ``(tree like params, carried values at the layer's input)``."""
    if quantity.skips(layer):
        return (), carried
    through = getattr(layer, "walk", None)
    if callable(through):
        return through(quantity, params, caches, carried)
    return quantity.at_unit(layer, params, caches, carried)


class Quantity:
    """A quantity carried down the network, and what each unit contributes to it.

    ``rule`` names the method a layer defines to compute the quantity faster than the default; the rule takes
    ``(params, cache, dy)`` and returns ``(this layer's share, dx)``. :meth:`default` derives the share from the
    rules every layer has. :meth:`finish` turns the tree of shares into the quantity (a sum, for norms)."""

    rule = ""
    # Whether every carried value is a cotangent (or a stack of them along leading axes) that each unit passes down
    # as its ``backward`` does: a compound layer may then pass it with a faster map of its own (its
    # ``input_cotangent``) that equals its inner network's.
    carries_cotangents = False

    def skips(self, layer: Any) -> bool:
        """Whether the walk passes ``layer`` by whole (its share ``()``, the carried values unchanged): only for a
        quantity that concerns some layers alone, such as the state of the layers that keep one."""
        return False

    def at_unit(self, layer: Any, params: Params, caches: tuple, carried: tuple) -> tuple[Any, tuple]:
        own = own_rule(layer, self.rule)
        if own is None:
            return self.default(layer, params, caches, carried)
        share, dx = own(params, caches[0], carried[0])
        return share, (dx,)

    def default(self, layer: Any, params: Params, caches: tuple, carried: tuple) -> tuple[Any, tuple]:
        raise MissingRule(layer, self.rule)

    def tie(self, layer: Any, first: Any, second: Any) -> Any:
        """The share of one parameter that ``layer`` uses twice (tied weights), from the shares of its two uses. A
        quantity linear in the parameter's gradient adds them; any other needs the cross terms between the uses,
        which its shares do not hold: then :class:`MissingRule`, and the drivers that can fall back to one example
        at a time do (exact for per-example quantities)."""
        raise MissingRule(layer, self.rule)

    def tie_at(self, layer: Any, params: Params, caches: tuple, carried: tuple, first: Any, second: Any) -> Any:
        """:meth:`tie` with what the walk knows at the tied layer (its params, its caches, the values carried into
        its output), for a quantity whose cross terms between the two uses can be computed from them (the Hessian
        diagonal); by default :meth:`tie`."""
        return self.tie(layer, first, second)

    def finish(self, shares: Any, carried: tuple) -> Any:
        return shares

    # How a combinator handles a carried value (one stream's): before it feeds several paths whose inputs add
    # up, split among the pieces of a concatenation, and added where paths meet. Cotangents need nothing more.
    def fork(self, value: Any) -> Any:
        return value

    def split(self, value: Any, bounds: list[int]) -> list[Any]:
        return jnp.split(value, bounds, axis=-1)

    def join(self, a: Any, b: Any) -> Any:
        return add_cotangents(a, b)

    def run(self, layer: Any, params: Params, cache: Cache, dy: Array) -> tuple[Any, Array]:
        """The quantity over one stream: ``(quantity, dx)``."""
        shares, (dx,) = walk(layer, self, params, (cache,), (dy,))
        return self.finish(shares, (dy,)), dx

    def __repr__(self) -> str:
        return f"<quantity {self.rule}>"


class StackedQuantity(Quantity):
    """A quantity that carries a stack of cotangents per stream, ``(K, batch, *output)``: one per network output
    for the NTK, one per column of the loss Hessian's square root for curvature. Every unit passes each stack
    down through its ``backward``, one entry at a time (``jax.vmap``); its share comes from its own rule, which
    takes ``(params, *caches, *stacks)``, or from :meth:`share`, the default built from the per-example rule."""

    carries_cotangents = True

    def at_unit(self, layer, params, caches, carried):
        down = tuple(
            jax.vmap(lambda dy, cache=cache: layer.backward(params, cache, dy)[1])(stack)
            for cache, stack in zip(caches, carried)
        )
        if not has_params(params):
            return (), down
        return self.share_of(layer, params, caches, carried), down

    def share_of(self, layer: Any, params: Params, caches: tuple, carried: tuple) -> Any:
        """The unit's share: its own rule if it has one, else the default."""
        own = own_rule(layer, self.rule)
        return own(params, *caches, *carried) if own is not None else self.share(layer, params, caches, carried)

    def share(self, layer: Any, params: Params, caches: tuple, carried: tuple) -> Any:
        raise MissingRule(layer, self.rule)


class Backward(Quantity):
    """The gradient: every unit's ``backward``. Its shares are the parameter gradients."""

    rule = "backward"
    carries_cotangents = True

    def at_unit(self, layer, params, caches, carried):
        share, dx = super().at_unit(layer, params, caches, carried)
        check_gradient_shapes(layer, params, share)
        return share, dx

    def tie(self, layer, first, second):
        return add_trees(first, second)


BACKWARD = Backward()


class Composite(Layer):
    """A layer made of layers (the combinators, and layers defined by an inner network). It says once, in
    :meth:`walk`, how any quantity passes through it; ``backward`` and every optional rule follow from that, so a
    composite never has a method per quantity."""

    def walk(self, quantity: Quantity, params: Params, caches: tuple, carried: tuple) -> tuple[Any, tuple]:
        raise NotImplementedError

    def backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        return BACKWARD.run(self, params, cache, dy)

    def tangent_walk(self, params: Params, cache: Cache, dparams: Params, dx: Array | None) -> tuple[Any, Any]:
        raise NotImplementedError

    def tangent(self, params: Params, cache: Cache, dparams: Params, dx: Array | None) -> Array | None:
        """The Jacobian-vector product through every layer inside (see :func:`tangent_walk`)."""
        return self.tangent_walk(params, cache, dparams, dx)[0]


class Compound(Composite):
    """A layer that is an inner network with a parameter layout of its own: Conv2D is windows followed by a dense
    product; attention is three projections, a core and an output projection. Subclasses say what the inner
    network is and how the two parameter layouts correspond; every walk goes through the inner network.

    A subclass may also define ``input_cotangent(params, cache, dy) -> dx``, its input cotangent for an output
    cotangent ``dy`` with any leading axes, computed faster than the inner network's walk computes it (Conv2D: one
    transposed convolution instead of the window gradient and ``col2im``). For the quantities that carry plain
    cotangents it replaces the walk's own, which ``jit`` then never computes."""

    input_cotangent: Callable[..., Array] | None = None

    def network(self, cache: Cache) -> Any:
        """The inner network that produced ``cache`` (its sizes may be read from the cache's shapes)."""
        raise NotImplementedError

    def to_network(self, params: Params) -> Params:
        """This layer's params in the inner network's layout."""
        raise NotImplementedError

    def from_network(self, tree: Any) -> Any:
        """A tree in the inner network's layout (gradients, or any quantity's shares) in this layer's layout."""
        raise NotImplementedError

    def walk(self, quantity, params, caches, carried):
        shares, down = walk(self.network(caches[0]), quantity, self.to_network(params), caches, carried)
        if quantity.carries_cotangents and self.input_cotangent is not None:
            down = tuple(self.input_cotangent(params, cache, dy) for cache, dy in zip(caches, carried))
        return self.from_network(shares), down

    def tangent_walk(self, params, cache, dparams, dx):
        inner = self.network(cache)
        return tangent_walk(inner, self.to_network(params), cache, self.to_network(dparams), dx)


class Unit:
    """One unit the walk reached: the layer itself (not a pytree node, so that a tree of them keeps each whole)."""

    def __init__(self, layer: Any):
        self.layer = layer

    def __repr__(self) -> str:
        return f"Unit({self.layer!r})"


class _Units(Backward):
    """The gradient's walk, each unit's share the unit itself: where every unit sits in the params tree."""

    def at_unit(self, layer, params, caches, carried):
        return Unit(layer), super().at_unit(layer, params, caches, carried)[1]

    def tie(self, layer, first, second):
        return first  # the parameter's entry is its first use's


def units(net: Any, params: Params, x: Any) -> list[tuple[tuple, Any]]:
    """Every unit of ``net`` (wherever it sits: in a serial, residual or parallel block, inside a convolution or an
    attention layer) with the path of its entry in ``params``, as ``[(path keys, layer)]`` in the order of the params'
    leaves. A unit without an entry of its own (a convolution's windows, attention's core) is not listed. ``x`` is
    an input batch or its ``jax.ShapeDtypeStruct``: the walk runs abstractly (``jax.eval_shape``), computing
    nothing."""
    found: list[Any] = []

    def trace(p: Params, inputs: Array) -> Array:
        y, cache = call_forward(net, p, inputs)
        found.append(walk(net, _Units(), p, (cache,), (jnp.zeros_like(y),))[0])
        return y

    jax.eval_shape(trace, params, x)
    leaves = flatten_with_keys(found[0], is_leaf=lambda node: isinstance(node, Unit))
    return [(path, unit.layer) for path, unit in leaves if isinstance(unit, Unit)]
