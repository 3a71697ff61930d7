"""What a layer is: the protocol, and how combinators and drivers call any layer.

A layer is any object with three methods (see :class:`LayerProtocol`)::

    init(key, input_shape[, dtype]) -> (output_shape, params)     shapes without the batch axis
    forward(params, x)              -> (y, cache)
    backward(params, cache, dy)     -> (dparams, dx)               the vector-Jacobian product, derived by hand

A cache is a pytree of arrays only, so that it crosses ``jax.jit`` and ``jax.custom_vjp`` boundaries. Everything
else a layer may have is optional: ``apply``, the faster rules of the quantities (:mod:`mnet.quantities`),
``stochastic = True`` for a layer that draws randomness, ``stateful = True`` for one that keeps state, and ``walk``
for a layer made of layers. The functions here (:func:`init_layer`, :func:`call_forward`, :func:`apply_layer`) are
how combinators and drivers call any layer, whether or not it subclasses :class:`mnet.Layer`.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from mnet.errors import KindError

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
        raise KindError(f"{where} is {candidate!r}, not a layer ({reason})")


def default_float_dtype() -> jnp.dtype:
    """float64 when JAX x64 is on, float32 otherwise."""
    return jnp.zeros(()).dtype


def input_dtype(net: Any, params: Params) -> jnp.dtype:
    """The dtype of the inputs ``net`` takes: int32 token ids for a network that starts with an embedding
    (``input_vocab``), else its parameters' first floating dtype (the default float dtype without any)."""
    if getattr(net, "input_vocab", None) is not None:
        return jnp.dtype("int32")
    floats = [leaf.dtype for leaf in jax.tree_util.tree_leaves(params) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    return jnp.dtype(floats[0]) if floats else default_float_dtype()


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
    such a layer): it then takes ``state`` and ``train`` in ``forward`` (see :mod:`mnet.core.state`)."""
    return bool(getattr(layer, "stateful", False))


def takes_mask(layer: Any) -> bool:
    """Whether the layer reads a padding mask (attention, or a combinator holding attention): it then takes ``mask``
    in ``forward``, ``(batch, T)`` booleans, True at the positions that hold a token."""
    return bool(getattr(layer, "takes_mask", False))


#: Where :func:`call_forward` hands each call while :func:`intercepting` is active (None: call the layer).
_INTERCEPTOR: contextvars.ContextVar[Callable[..., Any] | None] = contextvars.ContextVar("mnet_forward_interceptor")


@contextlib.contextmanager
def intercepting(handler: Callable[..., Any] | None) -> Iterator[None]:
    """While active, every :func:`call_forward` (the one entry point through which combinators and drivers run a
    layer) calls ``handler(layer, params, x, forward, mask)`` instead, ``forward()`` being the layer's own forward
    pass and ``mask`` the padding mask it was given (None for none),
    ``(y, cache)``; ``None`` switches interception off inside. The checks use it to see every layer's actual input,
    which the backward walk's caches do not hold (:mod:`mnet.checking.units`). Trace-time only: nothing changes in
    the compiled program."""
    token = _INTERCEPTOR.set(handler)
    try:
        yield
    finally:
        _INTERCEPTOR.reset(token)


def call_forward(
    layer: Any,
    params: Params,
    x: Array,
    key: Array | None = None,
    train: bool = False,
    state: Any = None,
    **options: Any,
):
    """``layer.forward``, with the key and train flag passed only to a layer that has randomness, the state and
    train flag only to a layer that keeps state, and a padding mask (``mask=``, None for none) only to a layer that
    reads one (:func:`takes_mask`), so that the deterministic call ``forward(params, x)`` works for every layer.
    Other ``options`` go to the layer as they are."""
    if isinstance(layer, type):
        raise KindError(f"{layer.__name__} is a class; pass an instance, such as {layer.__name__}(...)")
    kwargs: dict[str, Any] = dict(options)
    mask = kwargs.pop("mask", None)
    if mask is not None and takes_mask(layer):
        kwargs["mask"] = mask
    if is_stochastic(layer):
        kwargs.update(key=key, train=train)
    if is_stateful(layer):
        kwargs.update(state=state, train=train)
    handler = _INTERCEPTOR.get(None)
    if handler is None:
        return layer.forward(params, x, **kwargs)
    return handler(layer, params, x, lambda: layer.forward(params, x, **kwargs), kwargs.get("mask"))


def apply_layer(layer: Any, params: Params, x: Array, **kwargs) -> Array:
    """The output alone, for any layer (``apply`` is optional in the protocol)."""
    return call_forward(layer, params, x, kwargs.get("key"), kwargs.get("train", False))[0]


def has_params(params: Params) -> bool:
    """Whether a parameter pytree holds any array (``()`` and ``{}`` do not)."""
    return bool(jax.tree_util.tree_leaves(params))
