"""Combinators: layers made of layers, whose backward is composed from their parts' backward."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from mnet.errors import LayerError
from mnet.layers import ACTIVATIONS_BY_NAME, Array, Cache, Dense, Layer, Params, Policy, Shape, _describe


def _split(key: Array | None, count: int) -> list:
    """One key per child (or None for each when no key was given)."""
    return [None] * count if key is None else list(jax.random.split(key, count))


def _forward(layer: Layer, params: Params, x: Array, key: Array | None, train: bool):
    """Call a child's forward, with the key and train flag only if the child has randomness."""
    return layer.forward(params, x, key=key, train=train) if layer.stochastic else layer.forward(params, x)


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

    @property
    def stochastic(self) -> bool:
        return any(layer.stochastic for layer in self.layers)

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

    def forward(self, params: Params, x: Array, *, key: Array | None = None, train: bool = False) -> tuple[Array, Cache]:
        self._check_params(params)
        keys = _split(key, len(self.layers))
        caches = []
        for index, (layer, layer_params) in enumerate(zip(self.layers, params)):
            try:
                x, cache = _forward(layer, layer_params, x, keys[index], train)
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


@dataclass(frozen=True, repr=False)
class Residual(Layer):
    """``y = x + block(x)``: a skip connection around any block whose output has its input's shape.

    Backward: the skip passes ``dy`` straight through and the block adds its own input gradient,
    ``dx = dy + block.backward(params, cache, dy).dx``; the block's parameter gradients are the residual's.
    Params are the block's params.
    """

    block: Layer

    def __repr__(self) -> str:
        return f"residual({self.block!r})"

    @property
    def stochastic(self) -> bool:
        return self.block.stochastic

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        try:
            output_shape, params = self.block.init(key, input_shape, dtype)
        except LayerError as error:
            raise _located(0, error) from None
        if tuple(output_shape) != tuple(input_shape):
            raise LayerError(self, f"the block maps shape {tuple(input_shape)} to {tuple(output_shape)}; "
                                   "a residual block must keep the shape")
        return tuple(input_shape), params

    def forward(self, params: Params, x: Array, *, key: Array | None = None, train: bool = False) -> tuple[Array, Cache]:
        try:
            y, cache = _forward(self.block, params, x, key, train)
        except LayerError as error:
            raise _located(0, error) from None
        if y.shape != x.shape:
            raise LayerError(self, f"the block maps shape {tuple(x.shape)} to {tuple(y.shape)}; it must keep the shape")
        return x + y, cache

    def backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        grads, dx = self.block.backward(params, cache, dy)
        return grads, dy + dx

    def per_example_backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        grads, dx = self.block.per_example_backward(params, cache, dy)
        return grads, dy + dx

    def per_example_sq_norms(self, params: Params, cache: Cache, dy: Array) -> tuple[Array, Array]:
        sq, dx = self.block.per_example_sq_norms(params, cache, dy)
        return sq, dy + dx

    def ntk_contribution(self, params: Params, cache1: Cache, cache2: Cache, dys1: Array, dys2: Array) -> Array:
        """The skip has no parameters: the block receives the residual's own output cotangents."""
        return self.block.ntk_contribution(params, cache1, cache2, dys1, dys2)


@dataclass(frozen=True, repr=False)
class Parallel(Layer):
    """Fan-out: every block sees the same input; outputs are summed (``combine="sum"``) or concatenated along
    the last axis (``combine="concat"``).

    Backward: each block receives its share of ``dy`` (all of it for a sum, its slice for a concatenation) and the
    input gradient is the sum of the blocks' input gradients, since ``x`` feeds every block. Params are a tuple
    with one entry per block.
    """

    blocks: tuple[Layer, ...]
    combine: str = "concat"

    def __post_init__(self):
        if self.combine not in ("sum", "concat"):
            raise ValueError(f"parallel: combine must be 'sum' or 'concat', got {self.combine!r}")
        if not self.blocks:
            raise ValueError("parallel needs at least one block")

    def __repr__(self) -> str:
        return f"parallel({', '.join(map(repr, self.blocks))}, combine={self.combine!r})"

    @property
    def stochastic(self) -> bool:
        return any(block.stochastic for block in self.blocks)

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        shapes, params = [], []
        for index, (block, block_key) in enumerate(zip(self.blocks, jax.random.split(key, len(self.blocks)))):
            try:
                shape, block_params = block.init(block_key, input_shape, dtype)
            except LayerError as error:
                raise _located(index, error) from None
            shapes.append(tuple(shape))
            params.append(block_params)
        if self.combine == "sum" and len(set(shapes)) > 1:
            raise LayerError(self, f"combine='sum' needs equal block output shapes, got {shapes}")
        if self.combine == "concat" and len({shape[:-1] for shape in shapes}) > 1:
            raise LayerError(self, f"combine='concat' needs block outputs equal but for the last axis, got {shapes}")
        out = shapes[0] if self.combine == "sum" else shapes[0][:-1] + (sum(shape[-1] for shape in shapes),)
        return out, tuple(params)

    def forward(self, params: Params, x: Array, *, key: Array | None = None, train: bool = False) -> tuple[Array, Cache]:
        if not isinstance(params, tuple) or len(params) != len(self.blocks):
            raise LayerError(self, f"expects a tuple of {len(self.blocks)} parameter entries, got {_describe(params)}")
        outputs, caches = [], []
        for index, (block, block_params, block_key) in enumerate(zip(self.blocks, params, _split(key, len(self.blocks)))):
            try:
                y, cache = _forward(block, block_params, x, block_key, train)
            except LayerError as error:
                raise _located(index, error) from None
            outputs.append(y)
            caches.append(cache)
        if self.combine == "sum":
            return sum(outputs[1:], outputs[0]), tuple(caches)
        # The widths are recorded as zero-size arrays so that backward can split dy (see Flatten).
        widths = tuple(jnp.zeros((0, y.shape[-1]), y.dtype) for y in outputs)
        return jnp.concatenate(outputs, axis=-1), (tuple(caches), widths)

    def _shares(self, caches: Cache, dy: Array) -> tuple[tuple, list[Array]]:
        """Each block's cache and its part of the output cotangent(s) (works on a leading stack axis too)."""
        if self.combine == "sum":
            return caches, [dy] * len(self.blocks)
        caches, widths = caches
        bounds = list(itertools.accumulate(w.shape[1] for w in widths))[:-1]  # static: the widths are shapes
        return caches, jnp.split(dy, bounds, axis=-1)

    def _combined(self, method: str, params: Params, caches: Cache, dy: Array):
        caches, shares = self._shares(caches, dy)
        results = [getattr(block, method)(p, c, d) for block, p, c, d in zip(self.blocks, params, caches, shares)]
        return results, sum((dx for _, dx in results[1:]), results[0][1])

    def backward(self, params: Params, caches: Cache, dy: Array) -> tuple[Params, Array]:
        results, dx = self._combined("backward", params, caches, dy)
        return tuple(grads for grads, _ in results), dx

    def per_example_backward(self, params: Params, caches: Cache, dy: Array) -> tuple[Params, Array]:
        results, dx = self._combined("per_example_backward", params, caches, dy)
        return tuple(grads for grads, _ in results), dx

    def per_example_sq_norms(self, params: Params, caches: Cache, dy: Array) -> tuple[Array, Array]:
        results, dx = self._combined("per_example_sq_norms", params, caches, dy)
        return sum((sq for sq, _ in results[1:]), results[0][0]), dx

    def ntk_contribution(self, params: Params, caches1: Cache, caches2: Cache, dys1: Array, dys2: Array) -> Array:
        caches1, shares1 = self._shares(caches1, dys1)
        caches2, shares2 = self._shares(caches2, dys2)
        parts = [block.ntk_contribution(p, c1, c2, d1, d2)
                 for block, p, c1, c2, d1, d2 in zip(self.blocks, params, caches1, caches2, shares1, shares2)]
        return sum(parts[1:], parts[0])


def residual(block: Layer) -> Residual:
    """``x + block(x)``; ``mnet.residual(mnet.serial(mnet.Dense(64), mnet.Relu(), mnet.Dense(64)))`` is a
    ResNet-style block in one line."""
    if not isinstance(block, Layer):
        raise TypeError(f"residual: {block!r} is not a layer")
    return Residual(block)


def parallel(*blocks: Layer, combine: str = "concat") -> Parallel:
    """Fan-out to ``blocks`` on the same input, outputs summed (``combine="sum"``) or concatenated on the last
    axis (``"concat"``, the default)."""
    for index, block in enumerate(blocks):
        if not isinstance(block, Layer):
            raise TypeError(f"parallel: argument {index} is {block!r}, not a layer")
    return Parallel(tuple(blocks), combine)


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
