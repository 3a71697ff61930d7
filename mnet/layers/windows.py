"""Sliding windows over NHWC images: the geometry (kernel, stride, padding, output size), ``im2col`` which lays
every window out as a row, its adjoint ``col2im`` which adds rows back onto the image, and the ``Windows`` layer
made of the two.

Convolution and pooling are both "gather the windows, then do something per window", so both are built on
these two functions: a convolution is ``im2col`` followed by one matrix product, and every backward pass ends
with ``col2im`` of the per-window input gradient. ``col2im`` is the exact transpose of ``im2col`` (a window
entry that several windows share receives the sum of their gradients), which is all the chain rule asks.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from mnet.core.layer import Layer, shape_record
from mnet.core.protocol import Array, Cache, Params, Shape
from mnet.errors import SettingError

Pair = tuple[int, ...]  # (rows, columns)


def pair(value, name: str, owner: str) -> Pair:
    """``3 -> (3, 3)``; ``(3, 2)`` stays; anything else (or a non-positive size) is a ``ValueError``."""
    values = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(values, tuple)
        or len(values) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    ):
        raise SettingError(f"{owner}: {name} must be a positive int or a pair of them, got {value!r}")
    return values


def check_padding(padding, owner: str):
    """``"VALID"``, ``"SAME"``, a non-negative int (each side), or ``((top, bottom), (left, right))``."""
    if isinstance(padding, str):
        if padding.upper() not in ("VALID", "SAME"):
            raise SettingError(
                f"{owner}: padding must be 'VALID', 'SAME', an int or ((top, bottom), (left, right)), got {padding!r}"
            )
        return padding.upper()
    if isinstance(padding, int) and not isinstance(padding, bool) and padding >= 0:
        return ((padding, padding), (padding, padding))
    if (
        isinstance(padding, tuple)
        and len(padding) == 2
        and all(isinstance(p, tuple) and len(p) == 2 and all(isinstance(v, int) and v >= 0 for v in p) for p in padding)
    ):
        return padding
    raise SettingError(
        f"{owner}: padding must be 'VALID', 'SAME', a non-negative int or ((top, bottom), (left, right)), "
        f"got {padding!r}"
    )


@dataclass(frozen=True)
class Geometry:
    """Where the windows of one layer fall on an ``(height, width)`` image.

    ``pads`` are ``((top, bottom), (left, right))``; ``out`` is the number of window positions per axis,
    ``(in + pad_before + pad_after - kernel) // stride + 1``. "SAME" follows TensorFlow and
    ``jax.lax.conv_general_dilated``: ``out = ceil(in / stride)`` with the extra row or column at the bottom/right.
    """

    image: Pair
    kernel: Pair
    stride: Pair
    pads: tuple[Pair, Pair]

    @classmethod
    def of(cls, image: Pair, kernel: Pair, stride: Pair, padding) -> Geometry:
        if padding == "VALID":
            pads = ((0, 0), (0, 0))
        elif padding == "SAME":

            def same(size, k, s):
                total = max((-(-size // s) - 1) * s + k - size, 0)
                return (total // 2, total - total // 2)

            pads = tuple(same(n, k, s) for n, k, s in zip(image, kernel, stride))
        else:
            pads = padding
        return cls(tuple(image), kernel, stride, pads)

    @property
    def padded(self) -> Pair:
        return tuple(n + lo + hi for n, (lo, hi) in zip(self.image, self.pads))

    @property
    def out(self) -> Pair:
        return tuple((p - k) // s + 1 for p, k, s in zip(self.padded, self.kernel, self.stride))

    @property
    def window_size(self) -> int:
        return self.kernel[0] * self.kernel[1]

    def problem(self) -> str | None:
        """Why no window fits (the kernel is larger than the padded image), or None."""
        if any(k > p for k, p in zip(self.kernel, self.padded)):
            return (
                f"kernel {self.kernel} is larger than the padded input {self.padded} "
                f"(input {self.image}, padding {self.pads})"
            )
        return None


def im2col(x: Array, g: Geometry, fill: float = 0.0) -> Array:
    """``(batch, H, W, C) -> (batch, out_h, out_w, kh * kw, C)``: entry ``[b, i, j, u * kw + v, c]`` is
    ``x_padded[b, i * sh + u, j * sw + v, c]``. Padding takes the value ``fill`` (0 for a convolution,
    -inf for max pooling). One strided slice per kernel offset ``(u, v)``: kh * kw slices, no gather."""
    batch, channels = x.shape[0], x.shape[-1]
    (out_h, out_w), (sh, sw) = g.out, g.stride
    padded = jnp.pad(x, ((0, 0), g.pads[0], g.pads[1], (0, 0)), constant_values=fill)
    if tiles(g):
        (kh, kw) = g.kernel
        blocks = padded[:, : out_h * kh, : out_w * kw, :].reshape(batch, out_h, kh, out_w, kw, channels)
        return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(batch, out_h, out_w, kh * kw, channels)
    offsets = [
        jax.lax.slice(
            padded, (0, u, v, 0), (batch, u + sh * (out_h - 1) + 1, v + sw * (out_w - 1) + 1, channels), (1, sh, sw, 1)
        )
        for u in range(g.kernel[0])
        for v in range(g.kernel[1])
    ]
    return jnp.stack(offsets, axis=3)


def tiles(g: Geometry) -> bool:
    """Whether the windows tile the padded image without overlap (stride equal to the window, as in the usual 2x2
    pooling): then :func:`im2col` and :func:`col2im` are a reshape and a transpose."""
    return tuple(g.stride) == tuple(g.kernel)


def col2im(cols: Array, g: Geometry) -> Array:
    """The transpose of :func:`im2col`: ``(batch, out_h, out_w, kh * kw, C) -> (batch, H, W, C)``, every window
    entry added back at the image position it was read from (padding positions are dropped).

    Each kernel offset ``(u, v)`` contributes one strided grid of positions, added in place into one padded image
    (``.at[u::sh, v::sw].add``). Summing the grids as ``kh * kw`` separately padded images instead (``lax.pad``
    with interior padding) left XLA's CPU schedule holding four of them at once beside the window gradient: in the
    digits CNN step that made the hand path's temporary memory 1.09x autodiff's; in place it is 0.84x
    (BENCHMARKS.md, "Memory of long sequences")."""
    (sh, sw), (ph, pw) = g.stride, g.padded
    (out_h, out_w) = g.out
    (top, _), (left, _) = g.pads
    if tiles(g):  # every entry in at most one window: a transpose, where scatter-adds cost 15x more on XLA's CPU
        (kh, kw), (batch, channels) = g.kernel, (cols.shape[0], cols.shape[-1])
        blocks = cols.reshape(batch, out_h, out_w, kh, kw, channels).transpose(0, 1, 3, 2, 4, 5)
        blocks = blocks.reshape(batch, out_h * kh, out_w * kw, channels)
        total = jnp.pad(blocks, ((0, 0), (0, ph - out_h * kh), (0, pw - out_w * kw), (0, 0)))
        return total[:, top : top + g.image[0], left : left + g.image[1], :]
    total = jnp.zeros((cols.shape[0], ph, pw, cols.shape[-1]), cols.dtype)
    for index in range(g.window_size):
        u, v = divmod(index, g.kernel[1])
        if (sh, sw) == (1, 1):  # a contiguous block: read, add, write back in place (no scatter)
            block = jax.lax.slice(total, (0, u, v, 0), (total.shape[0], u + out_h, v + out_w, total.shape[3]))
            total = jax.lax.dynamic_update_slice(total, block + cols[:, :, :, index, :], (0, u, v, 0))
        else:
            grid = (slice(None), slice(u, u + sh * (out_h - 1) + 1, sh), slice(v, v + sw * (out_w - 1) + 1, sw))
            total = total.at[grid].add(cols[:, :, :, index, :])
    return total[:, top : top + g.image[0], left : left + g.image[1], :]


def transposed_convolution(dz: Array, kernel: Array, g: Geometry, accumulate=None) -> Array:
    """``col2im(dz W^T)`` in one convolution, never building the window gradient ``dz W^T`` (``kh * kw`` times the
    input's size): ``dz`` of shape ``(..., out_h, out_w, c_out)`` (any leading axes, the batch last among them) and
    the HWIO ``kernel`` of shape ``(kh, kw, c_in, c_out)`` give ``(..., H, W, c_in)``.

    Input position ``p`` (in padded coordinates) is read by window ``o`` at offset ``u = p - o s``, so
    ``dx[p] = sum_u dz'[p - u] K[u]`` where ``dz'`` is ``dz`` with ``s - 1`` zeros between entries: a correlation of
    ``dz'`` with the kernel flipped in space and its channels swapped, padded by ``k - 1 - before`` in front and by
    whatever makes the result ``H`` long behind (either can be negative: a crop), then read from ``before`` on. XLA's
    convolution does this in place; in the CNN's exact GGN diagonal (640 columns through a 16-to-32-channel 3x3
    layer) it takes 14 ms where the product and ``col2im`` take 40 (BENCHMARKS.md)."""
    lead, (out_h, out_w, c_out) = dz.shape[:-3], dz.shape[-3:]
    flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
    pads = [
        (k - 1 - before, size + before - (out - 1) * s - 1)
        for (before, _), k, s, size, out in zip(g.pads, g.kernel, g.stride, g.image, (out_h, out_w))
    ]
    dx = jax.lax.conv_general_dilated(
        dz.reshape((-1, out_h, out_w, c_out)),
        flipped,
        (1, 1),
        pads,
        lhs_dilation=g.stride,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=accumulate,
    )
    return dx.reshape(lead + dx.shape[1:])


def check_image_input(layer: Layer, x: Array) -> None:
    """An NHWC batch: ``(batch, height, width, channels)``, floating point."""
    layer._check_input(x, min_rank=1)
    if x.ndim != 4:
        raise layer._fail(f"expects NHWC input (batch, height, width, channels), got shape {tuple(x.shape)}")


def image_geometry(layer: Layer, input_shape: Shape, kernel: Pair, stride: Pair, padding) -> Geometry:
    """The window geometry for one example of shape ``(height, width, channels)``, or a clear error."""
    shape = layer._check_input_shape(input_shape)
    if len(shape) != 3:
        raise layer._fail(
            f"expects examples of shape (height, width, channels), got {shape}; "
            "mnet.Reshape((h, w, c)) turns flat features into images"
        )
    geometry = Geometry.of(shape[:2], kernel, stride, padding)
    problem = geometry.problem()
    if problem:
        raise layer._fail(f"{problem}; input shape {shape}")
    return geometry


@dataclass(frozen=True, repr=False)
class Windows(Layer):
    """Every window of an NHWC image laid out as one row: ``(batch, H, W, C) -> (batch, out_h, out_w, kh * kw * C)``
    (entries ordered kernel row, kernel column, channel). Linear, so its backward is its transpose::

        y  = im2col(x)             reshaped, one row per window position
        dx = col2im(dy)            every window entry's gradient added back where it was read

    The first half of :class:`mnet.Conv2D` (whose second half is a dense product); the cache is the input's
    :func:`shape_record`, from which the geometry is rebuilt. ``kernel``, ``stride`` and ``padding`` are
    normalised as :func:`pair` and :func:`check_padding` return them."""

    curvature_free = True  # a linear rearrangement: the Hessian passes through its backward

    kernel: Pair
    stride: Pair
    padding: object

    def __repr__(self) -> str:
        return f"Windows({self.kernel}, stride={self.stride}, padding={self.padding!r})"

    def geometry(self, example_shape: Shape) -> Geometry:
        return Geometry.of(tuple(example_shape[:2]), self.kernel, self.stride, self.padding)

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        geometry = image_geometry(self, input_shape, self.kernel, self.stride, self.padding)
        return geometry.out + (geometry.window_size * input_shape[-1],), ()

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        check_image_input(self, x)
        patches = im2col(x, self.geometry(x.shape[1:]))
        return patches.reshape(patches.shape[:3] + (-1,)), shape_record(x)

    def tangent(self, params: Params, record: Cache, dparams: Params, dx: Array) -> Array:
        """Linear: the tangent's windows."""
        return self.forward(params, dx)[0]

    def backward(self, params: Params, record: Cache, dcols: Array) -> tuple[Params, Array]:
        geometry = self.geometry(record.shape[1:])
        return (), col2im(dcols.reshape(dcols.shape[:3] + (geometry.window_size, -1)), geometry)
