"""What a layer is: the protocol, the ``Layer`` convenience base class, and the helpers every layer shares.

A layer is any object with three methods (see :class:`LayerProtocol`)::

    init(key, input_shape[, dtype]) -> (output_shape, params)     shapes without the batch axis
    forward(params, x)              -> (y, cache)
    backward(params, cache, dy)     -> (dparams, dx)               the vector-Jacobian product, derived by hand

A cache is a pytree of arrays only, so that it crosses ``jax.jit`` and ``jax.custom_vjp`` boundaries. Everything
else a layer may have is optional: ``apply``, the faster rules of the quantities below (per-example backward,
squared norms, NTK share), ``stochastic = True`` for a layer that draws randomness, and ``walk`` for a layer made
of layers. The functions here (:func:`init_layer`, :func:`call_forward`, :func:`apply_layer`) are how combinators
and drivers call any layer, whether or not it subclasses :class:`Layer`.

Layers check shapes where they enter and raise :class:`mnet.errors.LayerError` naming themselves and the shapes;
combinators add the position.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from mnet.errors import LayerError

Array = jax.Array
Params = Any
Cache = Any
Shape = tuple[int, ...]


@runtime_checkable
class LayerProtocol(Protocol):
    """The three methods that make an object a layer. Subclassing :class:`Layer` is never required."""

    def init(self, key: Array, input_shape: Shape) -> tuple[Shape, Params]: ...

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]: ...

    def backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]: ...


def is_layer(candidate: Any) -> bool:
    """True for an object (not a class: ``mnet.Relu`` without parentheses is not a layer) with callable
    ``init``, ``forward`` and ``backward``."""
    return not isinstance(candidate, type) and all(
        callable(getattr(candidate, name, None)) for name in ("init", "forward", "backward")
    )


def require_layer(candidate: Any, where: str) -> None:
    """A ``TypeError`` naming ``where`` unless ``candidate`` is a layer."""
    if not is_layer(candidate):
        reason = (
            "did you forget the parentheses?"
            if isinstance(candidate, type)
            else "a layer has init(key, input_shape), forward(params, x) and backward(params, cache, dy)"
        )
        raise TypeError(f"{where} is {candidate!r}, not a layer ({reason})")


def default_float_dtype() -> jnp.dtype:
    """float64 when JAX x64 is on, float32 otherwise."""
    return jnp.zeros(()).dtype


_INIT_TAKES_DTYPE: dict[type, bool] = {}


def _init_takes_dtype(layer_type: Any) -> bool:
    """Whether ``init`` of this layer class accepts ``dtype`` (looked up once per class; an unknown signature is
    given the dtype)."""
    if layer_type not in _INIT_TAKES_DTYPE:
        try:
            parameters = inspect.signature(layer_type.init).parameters
            takes = "dtype" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        except (TypeError, ValueError):
            takes = True
        _INIT_TAKES_DTYPE[layer_type] = takes
    return _INIT_TAKES_DTYPE[layer_type]


def init_layer(layer: Any, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
    """``layer.init``, passing ``dtype`` only to a layer whose ``init`` takes it; a layer whose ``init`` has no
    ``dtype`` gets its floating parameters cast to the requested dtype."""
    if dtype is None:
        return layer.init(key, input_shape)
    if _init_takes_dtype(type(layer)):
        return layer.init(key, input_shape, dtype)
    shape, params = layer.init(key, input_shape)
    cast = lambda leaf: leaf.astype(dtype) if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating) else leaf  # noqa: E731
    return shape, jax.tree_util.tree_map(cast, params)


def is_stochastic(layer: Any) -> bool:
    """Whether the layer draws randomness (dropout): it then takes ``key`` and ``train`` in ``forward``."""
    return bool(getattr(layer, "stochastic", False))


def is_stateful(layer: Any) -> bool:
    """Whether the layer keeps state beside its params (BatchNorm's running statistics, or a combinator holding
    such a layer): it then takes ``state`` and ``train`` in ``forward`` (see :mod:`mnet.layers.state`)."""
    return bool(getattr(layer, "stateful", False))


def call_forward(
    layer: Any, params: Params, x: Array, key: Array | None = None, train: bool = False, state: Any = None
):
    """``layer.forward``, with the key and train flag passed only to a layer that has randomness, and the state and
    train flag only to a layer that keeps state, so that the deterministic call ``forward(params, x)`` works for
    every layer."""
    kwargs: dict[str, Any] = {}
    if is_stochastic(layer):
        kwargs.update(key=key, train=train)
    if is_stateful(layer):
        kwargs.update(state=state, train=train)
    return layer.forward(params, x, **kwargs)


def apply_layer(layer: Any, params: Params, x: Array, **kwargs) -> Array:
    """The output alone, for any layer (``apply`` is optional in the protocol)."""
    return call_forward(layer, params, x, kwargs.get("key"), kwargs.get("train", False))[0]


def has_params(params: Params) -> bool:
    """Whether a parameter pytree holds any array (``()`` and ``{}`` do not)."""
    return bool(jax.tree_util.tree_leaves(params))


class Layer:
    """A convenience base class: ``apply``, the defaults of the optional rules, and boundary checks.

    Subclasses are frozen dataclasses (immutable and hashable, so they can be static arguments of ``jax.jit``) and
    define ``init``, ``forward`` and ``backward``. The optional rules (``per_example_backward``,
    ``per_example_sq_norms``, ``ntk_contribution``, ...) are methods here whose body runs the rule's walk
    (:class:`Quantity`): a layer overrides one only where its structure makes the quantity cheaper, and the
    walk uses an override when there is one and the rule's default otherwise.

    A layer with randomness (dropout) sets ``stochastic = True`` and takes
    ``forward(params, x, *, key=None, train=False)``; combinators pass a key and the train flag only to
    stochastic children.

    A layer whose output is linear (or piecewise linear) in its input and parameters jointly, with no products of
    the two (a rearrangement, a pool, a mask, a lookup), sets ``curvature_free = True``; the Hessian diagonal and
    Hessian-vector products then pass through its ``backward`` alone."""

    curvature_free = False

    @property
    def stochastic(self) -> bool:
        return False

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        raise NotImplementedError

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        raise NotImplementedError

    def backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        raise NotImplementedError

    def apply(self, params: Params, x: Array, **kwargs) -> Array:
        """The output alone: ``forward(params, x)[0]``."""
        return self.forward(params, x, **kwargs)[0]

    def per_example_backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        """Like ``backward`` for a ``dy`` whose rows are separate examples' cotangents, but every leaf of
        ``dparams`` keeps a leading batch axis: row ``b`` is example ``b``'s own parameter gradient."""
        return PER_EXAMPLE_BACKWARD.run(self, params, cache, dy)

    def per_example_sq_norms(self, params: Params, cache: Cache, dy: Array) -> tuple[Array, Array]:
        """``(sq, dx)``: ``sq[b]`` is the squared L2 norm of example ``b``'s parameter gradient over all leaves."""
        return PER_EXAMPLE_SQ_NORMS.run(self, params, cache, dy)

    def ntk_contribution(self, params: Params, cache1: Cache, cache2: Cache, dys1: Array, dys2: Array) -> Array:
        """This layer's share of the empirical NTK, ``sum_k sum_p J1[a, k, p] J2[c, k, p]`` over its own parameters
        ``p``, as ``(batch1, batch2)``. ``dys1``/``dys2`` are ``(K, batch, *output)``: for each network output
        ``k``, the cotangent that reaches this layer's output."""
        return NTK.run_pair(self, params, (cache1, cache2), (dys1, dys2))

    # Helpers for the checks every layer makes at its boundary.
    def _fail(self, detail: str) -> LayerError:
        return LayerError(self, detail)

    def _check_input(self, x: Array, min_rank: int = 2) -> None:
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise self._fail(f"expects an array input, got {type(x).__name__}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise self._fail(f"expects a floating-point input, got dtype {x.dtype} with shape {tuple(x.shape)}")
        if x.ndim < min_rank:
            raise self._fail(
                f"expects input of rank >= {min_rank} (batch, ...), got shape {tuple(x.shape)}; "
                "add a leading batch axis (x[None]) for a single example"
            )

    def _check_input_shape(self, input_shape: Shape, min_rank: int = 1) -> Shape:
        try:
            shape = tuple(int(d) for d in input_shape)
        except TypeError:
            raise self._fail(f"input_shape must be a tuple of ints, got {input_shape!r}") from None
        if len(shape) < min_rank or any(d <= 0 for d in shape):
            raise self._fail(
                f"expects an example shape of rank >= {min_rank} with positive sizes (no batch axis), got {shape}"
            )
        return shape

    def _check_no_params(self, params: Params) -> None:
        if params != ():
            raise self._fail(f"has no parameters and expects (), got {describe(params)}")


def batch_sq_norms(per_example: Params, batch: int, dtype) -> Array:
    """``(batch,)`` sums of squares over every leaf of a per-example pytree (leaves have a leading batch axis)."""
    total = jnp.zeros((batch,), dtype)
    for leaf in jax.tree_util.tree_leaves(per_example):
        total = total + jnp.sum(leaf.reshape(batch, -1) ** 2, axis=1)
    return total


def shape_record(x: Array) -> Array:
    """A zero-size array of shape ``(0, *example_shape)``: it records ``x``'s example shape in a cache as data that
    crosses ``jit`` and ``custom_vjp`` boundaries, at no memory cost."""
    return jnp.zeros((0,) + x.shape[1:], x.dtype)


def positive_int(value: Any, name: str, owner: str) -> None:
    """Refuse a size that is not a positive ``int`` (``bool`` is not a size) with a ``ValueError`` naming the layer."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def describe(tree: Any) -> str:
    """A short structural description of a pytree: arrays as their shapes, cut at 240 characters."""
    text = str(jax.tree_util.tree_map(lambda leaf: tuple(getattr(leaf, "shape", ())) or type(leaf).__name__, tree))
    return text if len(text) <= 240 else text[:237] + "..."


def located(index: int, error: LayerError) -> LayerError:
    """The same error, one level further out: its position gains ``index`` at the front."""
    return LayerError(error.layer, error.detail, (index,) + error.path)


def check_param_keys(layer: Layer, params: Params, expected: set[str]) -> None:
    """Params must be a dict with exactly the ``expected`` keys."""
    if not isinstance(params, dict) or set(params) != expected:
        raise layer._fail(f"expects params with keys {sorted(expected)}, got {describe(params)}")


def add_cotangents(a: Array, b: Array) -> Array:
    """``a + b`` for two input gradients of the same input; integer inputs have ``float0`` gradients, which stay."""
    return a if getattr(a, "dtype", None) == jax.dtypes.float0 else a + b


# ---------------------------------------------------------------------------------------------------------------
# The walk: one traversal for every quantity that carries a cotangent-like value down the network.
#
# A quantity is carried down in ``streams`` (one for a gradient; two for the NTK, which walks the caches of two
# batches side by side): ``caches`` and ``carried`` are tuples with one entry per stream. At a layer made of
# layers (one with a ``walk`` method: the combinators and composite layers) the walk goes inside; at any other
# layer (a unit) the quantity applies the layer's own rule if it has one, or else its default, derived from the
# rules every layer has. The walk returns a tree like the params down to each unit's entry (a unit's gradient,
# its per-example gradients, its squared norms, its NTK share, ...), and the carried values at the input.
# ---------------------------------------------------------------------------------------------------------------


class MissingRule(NotImplementedError):
    """A unit with parameters has no rule for a quantity that cannot be derived from ``backward`` alone; the
    drivers of :mod:`mnet.derivatives` then run the network one example at a time instead."""

    def __init__(self, layer: Any, rule: str):
        super().__init__(f"{layer!r} has no {rule} rule")
        self.layer, self.rule = layer, rule


def own_rule(layer: Any, name: str):
    """The layer's own method ``name``, or None when it has none or only inherits :class:`Layer`'s entry point."""
    method = getattr(layer, name, None)
    if method is None or getattr(type(layer), name, None) is getattr(Layer, name, object()):
        return None
    return method


def walk(layer: Any, quantity: Quantity, params: Params, caches: tuple, carried: tuple) -> tuple[Any, tuple]:
    """Carry ``quantity`` down through ``layer``: ``(tree like params, carried values at the layer's input)``."""
    if quantity.skips(layer):
        return (), carried
    through = getattr(layer, "walk", None)
    if callable(through):
        return through(quantity, params, caches, carried)
    return quantity.at_unit(layer, params, caches, carried)


# ---------------------------------------------------------------------------------------------------------------
# The forward walk: tangents (forward mode) go up the network, from the input to the output, through the caches
# that ``forward`` left. A unit's rule is ``tangent(params, cache, dparams, dx) -> dy``; a composite's is
# ``tangent_walk(params, cache, dparams, dx) -> (dy, record)``. The record holds, for every unit, the tangents that
# reached it, ``(dparams, dx)``, in the caches' own structure: the Hessian-vector walk reads it on the way down.
# ``dx = None`` is a zero tangent (a constant input: integer ids, or the data when only parameters move); a unit
# without parameters passes it on as None, so no product with zeros is ever computed.
# ---------------------------------------------------------------------------------------------------------------


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


def add_tangents(a: Array | None, b: Array | None) -> Array | None:
    """``a + b`` for tangents that may be None (zero)."""
    return b if a is None else a if b is None else a + b


class Quantity:
    """A quantity carried down the network, and what each unit contributes to it.

    ``rule`` names the method a layer defines to compute the quantity faster than the default; the rule takes
    ``(params, cache, dy)`` and returns ``(this layer's share, dx)``. :meth:`default` derives the share from the
    rules every layer has. :meth:`finish` turns the tree of shares into the quantity (a sum, for norms)."""

    rule = ""

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


class Backward(Quantity):
    """The gradient: every unit's ``backward``. Its shares are the parameter gradients."""

    rule = "backward"


class PerExampleBackward(Quantity):
    """Each example's own parameter gradient, every leaf with a leading batch axis.

    Default: a unit without parameters has nothing per-example to add, so its ``backward`` serves as is; a unit
    with parameters needs its own rule (there is no per-example gradient in ``backward``'s sum over examples)."""

    rule = "per_example_backward"

    def default(self, layer, params, caches, carried):
        if has_params(params):
            raise MissingRule(layer, self.rule)
        grads, dx = layer.backward(params, caches[0], carried[0])
        return grads, (dx,)


class PerExampleSqNorms(Quantity):
    """``(batch,)`` squared L2 norms of each example's gradient over all leaves; a unit's share is its own leaves'
    part. Default: from the per-example gradients."""

    rule = "per_example_sq_norms"

    def default(self, layer, params, caches, carried):
        grads, (dx,) = PER_EXAMPLE_BACKWARD.at_unit(layer, params, caches, carried)
        if not has_params(params):
            return (), (dx,)
        return batch_sq_norms(grads, carried[0].shape[0], carried[0].dtype), (dx,)

    def finish(self, shares, carried):
        dy = carried[0]
        return sum(jax.tree_util.tree_leaves(shares), jnp.zeros((dy.shape[0],), dy.dtype))


class StackedQuantity(Quantity):
    """A quantity that carries a stack of cotangents per stream, ``(K, batch, *output)``: one per network output
    for the NTK, one per column of the loss Hessian's square root for curvature. Every unit passes each stack
    down through its ``backward``, one entry at a time (``jax.vmap``); its share comes from its own rule, which
    takes ``(params, *caches, *stacks)``, or from :meth:`share`, the default built from the per-example rule."""

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


#: Stacks up to this many entries are summed as a chain of additions (see :func:`sum_stack`).
UNROLLED_STACK = 64


def sum_stack(a: Array, weights: Array | None = None) -> Array:
    """``sum_k weights[k] * a[k]`` over the leading (stack) axis of ``a``; ``weights`` ``(K, batch)`` or None for 1.

    A short stack is summed as ``K - 1`` additions, which XLA fuses into one pass: its CPU reduction over a short
    leading axis ran 60 times slower (2.7 ms against 0.045 ms for a ``(10, 128, 512)`` stack on the 2-core
    machine, jax 0.10.2), which alone made the exact GGN diagonal 4.4 gradients instead of 2.2."""
    if weights is not None:
        weights = weights.reshape(weights.shape + (1,) * (a.ndim - weights.ndim)).astype(a.dtype)
    if a.shape[0] > UNROLLED_STACK:
        return jnp.sum(a if weights is None else a * weights, axis=0)
    total = a[0] if weights is None else a[0] * weights[0]
    for k in range(1, a.shape[0]):
        total = total + (a[k] if weights is None else a[k] * weights[k])
    return total


def contract_stacks(per1: Any, per2: Any) -> Array:
    """``(batch1, batch2)``: ``sum_k <g1[k, a], g2[k, c]>`` over every leaf of two per-example stacks (leaves
    ``(K, batch, *leaf)``): the NTK share of per-example gradients."""
    leaves1, leaves2 = jax.tree_util.tree_leaves(per1), jax.tree_util.tree_leaves(per2)
    total = jnp.zeros((leaves1[0].shape[1], leaves2[0].shape[1]), leaves1[0].dtype)
    for g1, g2 in zip(leaves1, leaves2):
        total = total + jnp.einsum("kap,kcp->ac", g1.reshape(g1.shape[:2] + (-1,)), g2.reshape(g2.shape[:2] + (-1,)))
    return total


def _per_example_stack(layer: Any, params: Params, cache: Cache, stack: Array) -> Any:
    """The unit's per-example parameter gradients for every entry of a ``(K, batch, *output)`` stack: leaves
    ``(K, batch, *leaf)``."""
    return jax.vmap(lambda dy: PER_EXAMPLE_BACKWARD.at_unit(layer, params, (cache,), (dy,))[0])(stack)


class NeuralTangentKernel(StackedQuantity):
    """The empirical NTK of two batches, ``sum_k sum_p J1[a, k, p] J2[c, k, p]``: two streams, each carrying
    ``(K, batch, *output)`` cotangents (one per network output ``k``). A unit's rule is
    ``ntk_contribution(params, cache1, cache2, dys1, dys2) -> (batch1, batch2)``; the default contracts the
    per-example gradients of every output."""

    rule = "ntk_contribution"

    def share(self, layer, params, caches, carried):
        return contract_stacks(*(_per_example_stack(layer, params, c, stack) for c, stack in zip(caches, carried)))

    def finish(self, shares, carried):
        dys1, dys2 = carried
        return sum(jax.tree_util.tree_leaves(shares), jnp.zeros((dys1.shape[1], dys2.shape[1]), dys1.dtype))

    def run_pair(self, layer, params, caches: tuple, carried: tuple) -> Array:
        shares, _ = walk(layer, self, params, caches, carried)
        return self.finish(shares, carried)


class PerExampleDiagGGN(StackedQuantity):
    """Each example's GGN diagonal, ``diag(J_b^T H_b J_b) = sum_c (J_b^T S[c, b])^2`` entry by entry, from the
    ``(C, batch, *output)`` columns ``S`` of the loss Hessian's square root (``H_b = sum_c S[c, b] S[c, b]^T``).
    A unit's rule is ``per_example_diag_ggn(params, cache, S) -> like params, leaves (batch, *leaf)``; the
    default squares the per-example gradient of every column and sums over the columns."""

    rule = "per_example_diag_ggn"

    def share(self, layer, params, caches, carried):
        per = _per_example_stack(layer, params, caches[0], carried[0])
        return jax.tree_util.tree_map(lambda g: sum_stack(g * g), per)


class DiagGGN(StackedQuantity):
    """The GGN diagonal summed over the batch, ``sum_b diag(J_b^T H_b J_b)`` (the driver divides by the batch). A
    unit's rule is ``diag_ggn(params, cache, S) -> like params``; the default sums the per-example diagonal, so a
    layer that overrides only ``per_example_diag_ggn`` serves both."""

    rule = "diag_ggn"

    def share(self, layer, params, caches, carried):
        per_example = PER_EXAMPLE_DIAG_GGN.share_of(layer, params, caches, carried)
        return jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), per_example)


class KroneckerFactors(StackedQuantity):
    """Each layer's Kronecker factors ``A`` (its inputs' second moment) and ``G`` (the second moment of the
    loss-Hessian square root's columns carried back to its output), from the ``(C, batch, *output)`` columns. A
    unit's rule is ``kronecker_factors(params, cache, S) -> {"A": ..., "G": ...}``; a unit with parameters and no
    rule gets ``None`` (it has no Kronecker structure the walk could know of)."""

    rule = "kronecker_factors"

    def share(self, layer, params, caches, carried):
        return None


BACKWARD = Backward()
PER_EXAMPLE_BACKWARD = PerExampleBackward()
PER_EXAMPLE_SQ_NORMS = PerExampleSqNorms()
NTK = NeuralTangentKernel()
PER_EXAMPLE_DIAG_GGN = PerExampleDiagGGN()
DIAG_GGN = DiagGGN()
KRONECKER_FACTORS = KroneckerFactors()


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
    network is and how the two parameter layouts correspond; every walk goes through the inner network."""

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
        shares, carried = walk(self.network(caches[0]), quantity, self.to_network(params), caches, carried)
        return self.from_network(shares), carried

    def tangent_walk(self, params, cache, dparams, dx):
        inner = self.network(cache)
        return tangent_walk(inner, self.to_network(params), cache, self.to_network(dparams), dx)
