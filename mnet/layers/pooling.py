"""Max and average pooling over NHWC windows, each with its backward beside it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

from mnet.core.layer import Layer, shape_record
from mnet.core.protocol import Array, Cache, Params, Shape
from mnet.errors import SettingError
from mnet.layers.windows import Geometry, check_image_input, check_padding, col2im, im2col, image_geometry, pair


@dataclass(frozen=True, repr=False)
class _Pool2D(Layer):
    """Shared by the two pools: hyperparameters, shape inference and the window geometry."""

    # Max-pooling selects and average-pooling averages: both piecewise linear, so the Hessian passes through
    # their backward alone (mnet.core.curvature).
    curvature_free = True

    window: Any = 2
    stride: Any = None
    padding: Any = "VALID"

    def __post_init__(self):
        name = type(self).__name__
        object.__setattr__(self, "window", pair(self.window, "window", name))
        object.__setattr__(self, "stride", self.window if self.stride is None else pair(self.stride, "stride", name))
        object.__setattr__(self, "padding", check_padding(self.padding, name))
        if self.padding not in ("VALID", "SAME") and any(max(pads) >= k for pads, k in zip(self.padding, self.window)):
            raise SettingError(
                f"{name}: padding {self.padding} must be smaller than the window {self.window} on each "
                "axis, so that every window holds part of the image"
            )

    def __repr__(self) -> str:
        options = "" if self.stride == self.window else f", stride={self.stride}"
        options += "" if self.padding == "VALID" else f", padding={self.padding!r}"
        return f"{type(self).__name__}({self.window}{options})"

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        geometry = image_geometry(self, input_shape, self.window, self.stride, self.padding)
        return geometry.out + (input_shape[-1],), ()

    def _geometry(self, x: Array, params: Params) -> Geometry:
        check_image_input(self, x)
        self._check_no_params(params)
        return image_geometry(self, x.shape[1:], self.window, self.stride, self.padding)

    def _from_record(self, record: Array) -> Geometry:
        return Geometry.of(record.shape[1:3], self.window, self.stride, self.padding)


@dataclass(frozen=True, repr=False)
class MaxPool2D(_Pool2D):
    """The largest entry of every ``window`` per channel.

    Forward: ``patches = im2col(x)`` with padding read as ``-inf`` (so padding never wins), then
    ``y = max over the window`` and ``m = argmax over the window``, cached.

    Backward: ``y`` depends on ``x`` only through the winning entry, with slope 1, so each output's gradient goes
    to its arg-max position: ``dpatches = onehot(m) * dy``, then ``dx = col2im(dpatches)`` (an entry that wins
    several overlapping windows collects all their gradients).

    Ties: when several entries of a window share the maximum, the whole gradient goes to the FIRST of them in
    row-major window order (``jnp.argmax``'s choice), as in PyTorch and XLA's ``select_and_scatter``
    (``jax.lax.reduce_window``'s gradient). It is a valid subgradient; ``jnp.max``'s own JVP splits it evenly
    among the tied entries instead, another valid choice.

    Arguments:
        window: ``k`` or ``(kh, kw)`` (default 2).
        stride: default: the window (non-overlapping windows).
        padding: ``"VALID"`` (default), ``"SAME"``, an int or ``((top, bottom), (left, right))``, each pad
            smaller than the window.
    """

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        geometry = self._geometry(x, params)
        patches = im2col(x, geometry, fill=-jnp.inf)
        winner = jnp.argmax(patches, axis=3)
        y = jnp.take_along_axis(patches, winner[:, :, :, None, :], axis=3)[:, :, :, 0, :]
        return y, (winner, shape_record(x))

    def tangent(self, params: Params, cache: Cache, dparams: Params, dx: Array) -> Array:
        """Piecewise linear: each output moves with its window's winner, ``dy = dpatches[m]`` (the same
        tie-breaking as the backward rule)."""
        winner, record = cache
        patches = im2col(dx, self._from_record(record))
        return jnp.take_along_axis(patches, winner[:, :, :, None, :], axis=3)[:, :, :, 0, :]

    def backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        winner, record = cache
        geometry = self._from_record(record)
        positions = jnp.arange(geometry.window_size)[:, None]
        dpatches = jnp.where(positions == winner[:, :, :, None, :], dy[:, :, :, None, :], jnp.zeros((), dy.dtype))
        return (), col2im(dpatches, geometry)


@dataclass(frozen=True, repr=False)
class AvgPool2D(_Pool2D):
    """The mean of every ``window`` per channel.

    Forward: ``y = sum over the window of im2col(x) / n``, where ``n = kh * kw`` counts padding as zeros
    (``count_include_pad=True``, PyTorch's default), or counts only the image entries in the window
    (``count_include_pad=False``, what TensorFlow's "SAME" average pooling does).

    Backward: ``y`` is linear in every window entry with slope ``1 / n``: ``dpatches = dy / n`` broadcast over
    the window, then ``dx = col2im(dpatches)``.

    Arguments:
        window, stride, padding: as :class:`MaxPool2D`.
        count_include_pad: whether padding counts in the divisor (default True).
    """

    count_include_pad: bool = True

    def _counts(self, geometry: Geometry, dtype) -> Array:
        """``(1, out_h, out_w, 1, 1)`` divisors: the window size, or how many image entries each window holds."""
        if self.count_include_pad:
            return jnp.full((1, 1, 1, 1, 1), geometry.window_size, dtype)
        ones = jnp.ones((1,) + geometry.image + (1,), dtype)
        return jnp.sum(im2col(ones, geometry), axis=3, keepdims=True)

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        geometry = self._geometry(x, params)
        y = jnp.sum(im2col(x, geometry) / self._counts(geometry, x.dtype), axis=3)
        return y, shape_record(x)

    def tangent(self, params: Params, record: Cache, dparams: Params, dx: Array) -> Array:
        """Linear: the tangent's window means."""
        return self.forward(params, dx)[0]

    def backward(self, params: Params, record: Cache, dy: Array) -> tuple[Params, Array]:
        geometry = self._from_record(record)
        counts = self._counts(geometry, dy.dtype)
        dpatches = jnp.broadcast_to(
            dy[:, :, :, None, :] / counts, dy.shape[:3] + (geometry.window_size,) + dy.shape[3:]
        )
        return (), col2im(dpatches, geometry)
