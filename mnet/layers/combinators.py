"""Combinators: layers made of layers. Each says once, in ``walk``, how a quantity carried down the network
(a gradient, per-example gradients, norms, NTK cotangents, ...) passes through it; ``backward`` and every other
rule follow from that (:class:`mnet.core.walk.Composite`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from mnet.core.layer import describe, located
from mnet.core.protocol import (
    Array,
    Cache,
    Params,
    Shape,
    call_forward,
    init_layer,
    is_stateful,
    is_stochastic,
    require_layer,
    takes_mask,
)
from mnet.core.sums import add_tangents
from mnet.core.tangent import tangent_walk
from mnet.core.walk import Composite, Quantity, walk
from mnet.errors import LayerError, SettingError


def _split(key: Array | None, count: int) -> list:
    """One key per child (or None for each when no key was given)."""
    return [None] * count if key is None else list(jax.random.split(key, count))


def _states(owner: Any, state: Any, count: int) -> list:
    """One state entry per child (None for each when no state was given): the state is a tuple like the params."""
    if state is None:
        return [None] * count
    if not isinstance(state, tuple) or len(state) != count:
        raise LayerError(
            owner,
            f"expects a state tuple of {count} entries (one per layer, () for a layer without state), "
            f"got {describe(state)}; make it with mnet.init_state(net, params, input_shape)",
        )
    return list(state)


@dataclass(frozen=True, repr=False)
class Serial(Composite):
    """Layers applied one after the other: ``y = f_n(... f_1(f_0(x)))``.

    Forward keeps every layer's cache; backward is the chain rule and nothing else, each layer's
    ``backward`` called in reverse order, its ``dx`` becoming the previous layer's ``dy``::

        dy_n = dy;   (dparams_k, dy_{k-1}) = f_k.backward(params_k, cache_k, dy_k)   for k = n ... 0

    Every other quantity is the same walk with something else carried down (:meth:`walk`).
    Params (and their gradients) are a tuple with one entry per layer; a parameterless layer has ``()``.
    """

    layers: tuple[Any, ...]

    def __repr__(self) -> str:
        return f"serial({', '.join(map(repr, self.layers))})"

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def stochastic(self) -> bool:
        return any(is_stochastic(layer) for layer in self.layers)

    @property
    def stateful(self) -> bool:
        return any(is_stateful(layer) for layer in self.layers)

    @property
    def takes_mask(self) -> bool:
        return any(takes_mask(layer) for layer in self.layers)

    @property
    def input_vocab(self) -> int | None:
        return getattr(self.layers[0], "input_vocab", None) if self.layers else None

    def __getitem__(self, index):
        return self.layers[index]

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        """Shape inference: each layer is initialised at the output shape of the one before."""
        keys = jax.random.split(key, max(len(self.layers), 1))
        params = []
        shape = input_shape
        for index, (layer, layer_key) in enumerate(zip(self.layers, keys)):
            try:
                shape, layer_params = init_layer(layer, layer_key, shape, dtype)
            except LayerError as error:
                raise located(index, error) from None
            params.append(layer_params)
        return tuple(shape), tuple(params)

    def _check_params(self, params: Params) -> None:
        if not isinstance(params, tuple) or len(params) != len(self.layers):
            raise LayerError(
                self,
                f"expects a tuple of {len(self.layers)} parameter entries (one per layer), got {describe(params)}",
            )

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: Array | None = None,
        train: bool = False,
        state: Any = None,
        mask: Array | None = None,
    ) -> tuple[Array, Cache]:
        self._check_params(params)
        keys = _split(key, len(self.layers))
        states = _states(self, state, len(self.layers))
        caches = []
        for index, (layer, layer_params) in enumerate(zip(self.layers, params)):
            try:
                x, cache = call_forward(layer, layer_params, x, keys[index], train, states[index], mask=mask)
            except LayerError as error:
                raise located(index, error) from None
            caches.append(cache)
        return x, tuple(caches)

    def walk(self, quantity: Quantity, params: Params, caches: tuple, carried: tuple) -> tuple[Any, tuple]:
        """The layers in reverse order, each one's carried input values becoming the next one's output values."""
        shares: list[Any] = [None] * len(self.layers)
        for index in reversed(range(len(self.layers))):
            try:
                shares[index], carried = walk(
                    self.layers[index], quantity, params[index], tuple(cache[index] for cache in caches), carried
                )
            except LayerError as error:  # a layer that cannot carry this quantity: say where it sits
                raise located(index, error) from None
        return tuple(shares), carried

    def tangent_walk(self, params: Params, cache: Cache, dparams: Params, dx: Array | None) -> tuple[Any, Any]:
        """The layers in order, each one's output tangent the next one's input tangent."""
        records = []
        for index, layer in enumerate(self.layers):
            try:
                dx, record = tangent_walk(layer, params[index], cache[index], dparams[index], dx)
            except LayerError as error:
                raise located(index, error) from None
            records.append(record)
        return dx, tuple(records)


@dataclass(frozen=True, repr=False)
class Residual(Composite):
    """``y = x + block(x)``: a skip connection around any block whose output has its input's shape.

    Backward: the skip passes ``dy`` straight through and the block adds its own input gradient,
    ``dx = dy + block.backward(params, cache, dy).dx``; the block's parameter gradients are the residual's.
    Params are the block's params.
    """

    block: Any

    def __repr__(self) -> str:
        return f"residual({self.block!r})"

    @property
    def stochastic(self) -> bool:
        return is_stochastic(self.block)

    @property
    def stateful(self) -> bool:
        return is_stateful(self.block)

    @property
    def takes_mask(self) -> bool:
        return takes_mask(self.block)

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        try:
            output_shape, params = init_layer(self.block, key, input_shape, dtype)
        except LayerError as error:
            raise located(0, error) from None
        if tuple(output_shape) != tuple(input_shape):
            raise LayerError(
                self,
                f"the block maps shape {tuple(input_shape)} to {tuple(output_shape)}; "
                "a residual block must keep the shape",
            )
        return tuple(input_shape), params

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: Array | None = None,
        train: bool = False,
        state: Any = None,
        mask: Array | None = None,
    ) -> tuple[Array, Cache]:
        try:
            y, cache = call_forward(self.block, params, x, key, train, state, mask=mask)
        except LayerError as error:
            raise located(0, error) from None
        if y.shape != x.shape:
            raise LayerError(self, f"the block maps shape {tuple(x.shape)} to {tuple(y.shape)}; it must keep the shape")
        return x + y, cache

    def walk(self, quantity: Quantity, params: Params, caches: tuple, carried: tuple) -> tuple[Any, tuple]:
        """The block receives the residual's own output values; the skip adds them to the block's input values."""
        carried = tuple(map(quantity.fork, carried))
        shares, inner = walk(self.block, quantity, params, caches, carried)
        return shares, tuple(map(quantity.join, carried, inner))

    def tangent_walk(self, params: Params, cache: Cache, dparams: Params, dx: Array | None) -> tuple[Any, Any]:
        """``dy = dx + block's tangent``."""
        try:
            inner, record = tangent_walk(self.block, params, cache, dparams, dx)
        except LayerError as error:
            raise located(0, error) from None
        return add_tangents(dx, inner), record


@dataclass(frozen=True, repr=False)
class Parallel(Composite):
    """Fan-out: every block sees the same input; outputs are summed (``combine="sum"``) or concatenated along
    the last axis (``combine="concat"``).

    Backward: each block receives its share of ``dy`` (all of it for a sum, its slice for a concatenation) and the
    input gradient is the sum of the blocks' input gradients, since ``x`` feeds every block. Params are a tuple
    with one entry per block.
    """

    blocks: tuple[Any, ...]
    combine: str = "concat"

    def __post_init__(self):
        if self.combine not in ("sum", "concat"):
            raise SettingError(f"parallel: combine must be 'sum' or 'concat', got {self.combine!r}")
        if not self.blocks:
            raise SettingError("parallel needs at least one block")

    def __repr__(self) -> str:
        return f"parallel({', '.join(map(repr, self.blocks))}, combine={self.combine!r})"

    @property
    def stochastic(self) -> bool:
        return any(is_stochastic(block) for block in self.blocks)

    @property
    def stateful(self) -> bool:
        return any(is_stateful(block) for block in self.blocks)

    @property
    def takes_mask(self) -> bool:
        return any(takes_mask(block) for block in self.blocks)

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        shapes, params = [], []
        for index, (block, block_key) in enumerate(zip(self.blocks, jax.random.split(key, len(self.blocks)))):
            try:
                shape, block_params = init_layer(block, block_key, input_shape, dtype)
            except LayerError as error:
                raise located(index, error) from None
            shapes.append(tuple(shape))
            params.append(block_params)
        if self.combine == "sum" and len(set(shapes)) > 1:
            raise LayerError(self, f"combine='sum' needs equal block output shapes, got {shapes}")
        if self.combine == "concat" and len({shape[:-1] for shape in shapes}) > 1:
            raise LayerError(self, f"combine='concat' needs block outputs equal but for the last axis, got {shapes}")
        out = shapes[0] if self.combine == "sum" else shapes[0][:-1] + (sum(shape[-1] for shape in shapes),)
        return out, tuple(params)

    def forward(
        self,
        params: Params,
        x: Array,
        *,
        key: Array | None = None,
        train: bool = False,
        state: Any = None,
        mask: Array | None = None,
    ) -> tuple[Array, Cache]:
        if not isinstance(params, tuple) or len(params) != len(self.blocks):
            raise LayerError(self, f"expects a tuple of {len(self.blocks)} parameter entries, got {describe(params)}")
        states = _states(self, state, len(self.blocks))
        outputs, caches = [], []
        for index, (block, block_params, block_key, block_state) in enumerate(
            zip(self.blocks, params, _split(key, len(self.blocks)), states)
        ):
            try:
                y, cache = call_forward(block, block_params, x, block_key, train, block_state, mask=mask)
            except LayerError as error:
                raise located(index, error) from None
            outputs.append(y)
            caches.append(cache)
        if self.combine == "sum":
            return sum(outputs[1:], outputs[0]), tuple(caches)
        # The widths are recorded as zero-size arrays so that backward can split dy (see Flatten).
        widths = tuple(jnp.zeros((0, y.shape[-1]), y.dtype) for y in outputs)
        return jnp.concatenate(outputs, axis=-1), (tuple(caches), widths)

    def _shares(self, quantity: Quantity, cache: Cache, dy: Any) -> tuple[tuple, list[Any]]:
        """Each block's cache and its part of the output values."""
        if self.combine == "sum":
            return cache, [quantity.fork(dy)] * len(self.blocks)
        caches, widths = cache
        bounds = list(itertools.accumulate(w.shape[1] for w in widths))[:-1]  # static: the widths are shapes
        return caches, quantity.split(dy, bounds)

    def walk(self, quantity: Quantity, params: Params, caches: tuple, carried: tuple) -> tuple[Any, tuple]:
        """Each block gets its share of the output values; ``x`` feeds every block, so the input values add up."""
        streams = [self._shares(quantity, cache, dy) for cache, dy in zip(caches, carried)]
        shares, inputs = [], None
        for index, (block, block_params) in enumerate(zip(self.blocks, params)):
            try:
                share, inner = walk(
                    block,
                    quantity,
                    block_params,
                    tuple(s[0][index] for s in streams),
                    tuple(s[1][index] for s in streams),
                )
            except LayerError as error:
                raise located(index, error) from None
            shares.append(share)
            inputs = inner if inputs is None else tuple(map(quantity.join, inputs, inner))
        assert inputs is not None  # parallel has at least one block
        return tuple(shares), inputs

    def tangent_walk(self, params: Params, cache: Cache, dparams: Params, dx: Array | None) -> tuple[Any, Any]:
        """Every block on the same input tangent; the output tangents summed or concatenated as the outputs are.
        The record mirrors the cache (with the widths for a concatenation), so the walk down splits it alike."""
        caches = cache if self.combine == "sum" else cache[0]
        outputs, records = [], []
        for index, block in enumerate(self.blocks):
            try:
                dy, record = tangent_walk(block, params[index], caches[index], dparams[index], dx)
            except LayerError as error:
                raise located(index, error) from None
            outputs.append(dy)
            records.append(record)
        if self.combine == "sum":
            total = None
            for dy in outputs:
                total = add_tangents(total, dy)
            return total, tuple(records)
        widths = cache[1]
        known = next((dy for dy in outputs if dy is not None), None)
        if known is not None:  # a block with a zero tangent still fills its columns of the concatenation
            outputs = [
                jnp.zeros(known.shape[:-1] + (w.shape[1],), known.dtype) if dy is None else dy
                for dy, w in zip(outputs, widths)
            ]
            known = jnp.concatenate(outputs, axis=-1)
        return known, (tuple(records), widths)


def residual(block: Any) -> Residual:
    """``x + block(x)``; ``mnet.residual(mnet.serial(mnet.Dense(64), mnet.Relu(), mnet.Dense(64)))`` is a
    ResNet-style block in one line."""
    require_layer(block, "residual: the block")
    return Residual(block)


def parallel(*blocks: Any, combine: str = "concat") -> Parallel:
    """Fan-out to ``blocks`` on the same input, outputs summed (``combine="sum"``) or concatenated on the last
    axis (``"concat"``, the default)."""
    for index, block in enumerate(blocks):
        require_layer(block, f"parallel: argument {index}")
    return Parallel(tuple(blocks), combine)


def serial(*layers: Any) -> Serial:
    """Compose layers in sequence (``mnet.serial(Dense(64), Relu(), Dense(10))``).

    Arguments:
        *layers: layers: mnet's, or any object with ``init``, ``forward`` and ``backward``; nested ``serial``
            blocks are allowed.

    Returns:
        A layer whose params are a tuple with one entry per layer.
    """
    for index, layer in enumerate(layers):
        require_layer(layer, f"serial: argument {index}")
    return Serial(tuple(layers))
