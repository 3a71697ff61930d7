"""Combinators: layers made of layers, whose backward is composed from their parts' backward."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from mnet.errors import LayerError
from mnet.layers import ACTIVATIONS_BY_NAME, Array, Cache, Dense, Layer, Params, Policy, Shape, _describe


def _located(index: int, error: LayerError) -> LayerError:
    """The same error, one level further out: its position gains ``index`` at the front."""
    return LayerError(error.layer, error.detail, (index,) + error.path)


@dataclass(frozen=True, repr=False)
class Serial(Layer):
    """Layers applied one after the other: ``y = f_n(... f_1(f_0(x)))``.

    Forward keeps every layer's cache; backward is the chain rule and nothing else, each layer's
    ``backward`` called in reverse order, its ``dx`` becoming the previous layer's ``dy``::

        dy_n = dy;   (dparams_k, dy_{k-1}) = f_k.backward(params_k, cache_k, dy_k)   for k = n ... 0

    Params (and their gradients) are a tuple with one entry per layer; a parameterless layer has ``()``.
    """

    layers: tuple[Layer, ...]

    def __repr__(self) -> str:
        return f"serial({', '.join(map(repr, self.layers))})"

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index):
        return self.layers[index]

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        """Shape inference: each layer is initialised at the output shape of the one before."""
        keys = jax.random.split(key, max(len(self.layers), 1))
        params = []
        shape = input_shape
        for index, (layer, layer_key) in enumerate(zip(self.layers, keys)):
            try:
                shape, layer_params = layer.init(layer_key, shape, dtype)
            except LayerError as error:
                raise _located(index, error) from None
            params.append(layer_params)
        return tuple(shape), tuple(params)

    def _check_params(self, params: Params) -> None:
        if not isinstance(params, tuple) or len(params) != len(self.layers):
            raise LayerError(
                self,
                f"expects a tuple of {len(self.layers)} parameter entries (one per layer), got {_describe(params)}",
            )

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        self._check_params(params)
        caches = []
        for index, (layer, layer_params) in enumerate(zip(self.layers, params)):
            try:
                x, cache = layer.forward(layer_params, x)
            except LayerError as error:
                raise _located(index, error) from None
            caches.append(cache)
        return x, tuple(caches)

    def backward(self, params: Params, caches: Cache, dy: Array) -> tuple[Params, Array]:
        grads: list[Any] = [None] * len(self.layers)
        for index in reversed(range(len(self.layers))):
            grads[index], dy = self.layers[index].backward(params[index], caches[index], dy)
        return tuple(grads), dy

    def per_example_backward(self, params: Params, caches: Cache, dy: Array) -> tuple[Params, Array]:
        grads: list[Any] = [None] * len(self.layers)
        for index in reversed(range(len(self.layers))):
            grads[index], dy = self.layers[index].per_example_backward(params[index], caches[index], dy)
        return tuple(grads), dy

    def per_example_sq_norms(self, params: Params, caches: Cache, dy: Array) -> tuple[Array, Array]:
        """The squared norm over all leaves is the sum of the layers' squared norms."""
        total = jnp.zeros((dy.shape[0],), dy.dtype)
        for index in reversed(range(len(self.layers))):
            sq, dy = self.layers[index].per_example_sq_norms(params[index], caches[index], dy)
            total = total + sq
        return total, dy

    def ntk_contribution(self, params: Params, caches1: Cache, caches2: Cache, dys1: Array, dys2: Array) -> Array:
        """The kernel is a sum over parameters, so over layers: each layer adds its share at the cotangents
        that reach it, then the cotangents (one per network output) move one layer down."""
        total = jnp.zeros((dys1.shape[1], dys2.shape[1]), dys1.dtype)
        for index in reversed(range(len(self.layers))):
            layer, layer_params = self.layers[index], params[index]
            total = total + layer.ntk_contribution(layer_params, caches1[index], caches2[index], dys1, dys2)
            if index:
                dys1 = jax.vmap(lambda dy, c=caches1[index]: layer.backward(layer_params, c, dy)[1])(dys1)
                dys2 = jax.vmap(lambda dy, c=caches2[index]: layer.backward(layer_params, c, dy)[1])(dys2)
        return total


def serial(*layers: Layer) -> Serial:
    """Compose layers in sequence (``mnet.serial(Dense(64), Relu(), Dense(10))``).

    Arguments:
        *layers: layer objects; nested ``serial`` blocks are allowed.

    Returns:
        A layer whose params are a tuple with one entry per layer.
    """
    for index, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"serial: argument {index} is {layer!r}, not a layer (did you forget the parentheses?)")
    return Serial(tuple(layers))


def mlp(widths: Sequence[int], activation: str | Layer = "relu", compute_dtype: str | None = None) -> Serial:
    """A multilayer perceptron: ``Dense(w)`` then ``activation`` for every width but the last, which is linear.

    ``mlp([128, 64, 10])`` is ``serial(Dense(128), Relu(), Dense(64), Relu(), Dense(10))``.

    Arguments:
        widths: output widths of the dense layers, the last being the network's output width.
        activation: a layer instance or a name from ``mnet.layers.ACTIVATIONS_BY_NAME``.
        compute_dtype: mixed precision (``"bfloat16"``/``"float16"``): every dense layer computes in it with
            float32 accumulation, and the last one returns float32 so the loss is computed exactly.
    """
    if isinstance(activation, str):
        try:
            activation = ACTIVATIONS_BY_NAME[activation]()
        except KeyError:
            known = ", ".join(sorted(ACTIVATIONS_BY_NAME))
            raise ValueError(f"unknown activation {activation!r}; known: {known}") from None
    if not widths:
        raise ValueError("mlp needs at least one width (the output width)")
    hidden = None if compute_dtype is None else Policy(compute_dtype)
    last = None if compute_dtype is None else Policy(compute_dtype, output_dtype="float32")
    layers: list[Layer] = []
    for width in widths[:-1]:
        layers += [Dense(width, policy=hidden), activation]
    return serial(*layers, Dense(widths[-1], policy=last))
