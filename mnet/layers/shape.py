"""Layers that only rearrange each example's entries: ``Flatten`` and ``Reshape``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mnet.core.curvature import Curvature
from mnet.core.layer import Layer, shape_record
from mnet.core.protocol import Array, Cache, Params, Shape
from mnet.errors import SettingError


class _Rearrange(Layer):
    """A layer that only moves each example's entries: the Hessian's diagonal is moved the same way, and a
    tangent moves as the input does (the layer is linear)."""

    curvature_free = True

    def tangent(self, params: Params, cache: Cache, dparams: Params, dx: Array) -> Array:
        return self.forward(params, dx)[0]

    def diag_hessian(self, params: Params, cache: Cache, curvature: Curvature) -> tuple[Params, Curvature]:
        def back(v: Array) -> Array:
            return self.backward(params, cache, v)[1]

        return (), curvature.reshaped(back)


@dataclass(frozen=True, repr=False)
class Flatten(_Rearrange):
    """``(batch, d1, ..., dk) -> (batch, d1 * ... * dk)``; ``dx = dy`` reshaped back.

    The cache is the input's :func:`shape_record`.
    """

    def __repr__(self) -> str:
        return "Flatten()"

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        shape = self._check_input_shape(input_shape)
        return (math.prod(shape),), ()

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        self._check_input(x)
        self._check_no_params(params)
        return x.reshape(x.shape[0], -1), shape_record(x)

    def backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        return (), dy.reshape((dy.shape[0],) + cache.shape[1:])  # the cache records the input's example shape


@dataclass(frozen=True, repr=False)
class Reshape(_Rearrange):
    """``(batch, *in_shape) -> (batch, *shape)`` with the same entries in the same (row-major) order; ``dx = dy``
    reshaped back. ``Reshape((8, 8, 1))`` turns the 64 flat digit features into an NHWC image.

    Arguments:
        shape: the example shape to produce; its size must equal the input's.
    """

    shape: tuple[int, ...]

    def __post_init__(self):
        shape = tuple(self.shape) if isinstance(self.shape, (tuple, list)) else None
        if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise SettingError(f"Reshape: shape must be a tuple of positive ints, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)

    def __repr__(self) -> str:
        return f"Reshape({self.shape})"

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        shape = self._check_input_shape(input_shape)
        if math.prod(shape) != math.prod(self.shape):
            raise self._fail(
                f"cannot reshape examples of shape {shape} ({math.prod(shape)} entries) to {self.shape} "
                f"({math.prod(self.shape)} entries)"
            )
        return self.shape, ()

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        self._check_input(x)
        self._check_no_params(params)
        if math.prod(x.shape[1:]) != math.prod(self.shape):
            raise self._fail(
                f"cannot reshape input of shape {tuple(x.shape)} to (batch, {', '.join(map(str, self.shape))})"
            )
        return x.reshape((x.shape[0],) + self.shape), shape_record(x)

    backward = Flatten.backward  # the same rule: dy reshaped back to the recorded example shape


@dataclass(frozen=True, repr=False)
class Transpose(_Rearrange):
    """Permute each example's axes: ``(batch, d_0, ..., d_k) -> (batch, d_axes[0], ..., d_axes[k])``, NumPy's
    ``transpose(axes)`` of every example; ``dx = dy`` permuted back by the inverse permutation.

    ``Transpose((1, 2, 0))`` turns a channels-first image ``(C, H, W)`` (PyTorch's, Equinox's and Flax's
    ``nnx.Conv`` with channels first) into mnet's ``(H, W, C)``, and ``Transpose((2, 0, 1))`` turns it back.

    Arguments:
        axes: a permutation of ``0 .. k`` (the example axes, no batch axis).
    """

    axes: tuple[int, ...]

    def __post_init__(self):
        axes = tuple(self.axes) if isinstance(self.axes, (tuple, list)) else None
        if not axes or sorted(axes) != list(range(len(axes))) or any(isinstance(a, bool) for a in axes):
            raise SettingError(f"Transpose: axes must be a permutation of 0 .. k, got {self.axes!r}")
        object.__setattr__(self, "axes", axes)

    def __repr__(self) -> str:
        return f"Transpose({self.axes})"

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        shape = self._check_input_shape(input_shape)
        if len(shape) != len(self.axes):
            raise self._fail(f"permutes {len(self.axes)} example axes, got examples of shape {shape}")
        return tuple(shape[a] for a in self.axes), ()

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        self._check_input(x)
        self._check_no_params(params)
        if x.ndim != len(self.axes) + 1:
            raise self._fail(f"permutes {len(self.axes)} example axes, got input of shape {tuple(x.shape)}")
        return x.transpose((0, *(a + 1 for a in self.axes))), ()

    def backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        inverse = sorted(range(len(self.axes)), key=lambda i: self.axes[i])
        return (), dy.transpose((0, *(a + 1 for a in inverse)))
