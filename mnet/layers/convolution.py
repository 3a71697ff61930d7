"""2-D convolution as im2col followed by one matrix product, with its backward beside it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from mnet import initializers
from mnet.core.layer import check_param_keys, positive_int
from mnet.core.protocol import Array, Cache, Params, Shape, default_float_dtype
from mnet.core.walk import Compound
from mnet.layers.combinators import Serial
from mnet.layers.dense import Dense, Policy
from mnet.layers.windows import (
    Geometry,
    Windows,
    check_image_input,
    check_padding,
    image_geometry,
    pair,
    transposed_convolution,
)


@dataclass(frozen=True, repr=False)
class Conv2D(Compound):
    """2-D convolution (cross-correlation, as in every deep learning library) over NHWC inputs.

    Forward, for ``x`` of shape ``(batch, H, W, c_in)``: lay every ``kh x kw`` window out as a row, then one product::

        cols = im2col(x)           (batch * out_h * out_w, kh * kw * c_in)
        Z    = cols W + b          W: (kh * kw * c_in, c_out), b: (c_out,)

    and ``Z`` reshaped to ``(batch, out_h, out_w, c_out)``. Every output position is a dense layer applied to its
    window, with the same ``W`` everywhere, so the backward is the dense layer's summed over positions::

        dW   = cols^T dZ           (one product; sums every position of every example)
        db   = sum of dZ over batch and positions
        dX   = col2im(dZ W^T)      (each window's input gradient added back where the window was read)

    and ``col2im(dZ W^T)`` is itself one transposed convolution of ``dZ`` (the kernel flipped, its channels
    swapped), which :meth:`input_cotangent` computes without the ``kh * kw`` times larger window gradient: the walk of
    every quantity that carries plain cotangents (the gradient, per-example quantities, the GGN's columns) hands that
    down instead of the inner network's own (:class:`mnet.core.walk.Compound`).

    Parameter layout: ``{"W": (kh * kw * c_in, c_out), "b": (c_out,)}``, rows ordered (kernel row, kernel column,
    input channel), so ``W.reshape(kh, kw, c_in, c_out)`` is the HWIO kernel that
    ``jax.lax.conv_general_dilated(x, kernel, stride, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))`` takes.

    So the layer is the network ``serial(Windows, Dense)`` (:meth:`network`) with the dense layer's params as its
    own, and every quantity walks through those two parts: per-example gradients, their norms and the NTK are the
    dense layer's rules with the windows as positions (``dW_b = cols_b^T dZ_b``, and
    ``||dW_b||^2 = <cols_b cols_b^T, dZ_b dZ_b^T>`` when that Gram form is cheaper), and every input gradient
    ends in the windows' ``col2im``.

    Arguments:
        out_channels: ``c_out``.
        kernel_size: ``k`` or ``(kh, kw)``.
        stride: ``s`` or ``(sh, sw)`` (default 1).
        padding: ``"VALID"`` (default: no padding), ``"SAME"`` (``out = ceil(in / stride)``, as TensorFlow and
            ``jax.lax``), an int ``p`` (``p`` zeros on every side) or ``((top, bottom), (left, right))``.
        W_init, b_init: initializers (default LeCun normal with fan-in ``kh * kw * c_in``, zero bias).
        use_bias: ``False`` drops ``b``.
        policy: a :class:`mnet.Policy` for mixed precision, as for :class:`mnet.Dense`.
    """

    out_channels: int
    kernel_size: Any = 3
    stride: Any = 1
    padding: Any = "VALID"
    W_init: Any = "lecun_normal"
    b_init: Any = "zeros"
    use_bias: bool = True
    policy: Policy | None = None

    def __post_init__(self):
        positive_int(self.out_channels, "out_channels", "Conv2D")
        object.__setattr__(self, "kernel_size", pair(self.kernel_size, "kernel_size", "Conv2D"))
        object.__setattr__(self, "stride", pair(self.stride, "stride", "Conv2D"))
        object.__setattr__(self, "padding", check_padding(self.padding, "Conv2D"))
        initializers.get(self.W_init), initializers.get(self.b_init)

    def __repr__(self) -> str:
        options = "" if self.stride == (1, 1) else f", stride={self.stride}"
        options += "" if self.padding == "VALID" else f", padding={self.padding!r}"
        return f"Conv2D({self.out_channels}, {self.kernel_size}{options})"

    def network(self, cache: Cache = None) -> Serial:
        """``serial(Windows, Dense)``: the windows as rows, then the product every window goes through."""
        return Serial(
            (
                Windows(self.kernel_size, self.stride, self.padding),
                Dense(self.out_channels, self.W_init, self.b_init, self.use_bias, self.policy),
            )
        )

    def to_network(self, params: Params) -> Params:
        return ((), params)

    def from_network(self, tree: Any) -> Any:
        return tree[1]

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        geometry = image_geometry(self, input_shape, self.kernel_size, self.stride, self.padding)
        dtype = default_float_dtype() if dtype is None else dtype
        (kh, kw), c_in = self.kernel_size, input_shape[-1]
        key_W, key_b = jax.random.split(key)
        # Initialised as the HWIO kernel so that fan-in and fan-out count the receptive field, as frameworks do.
        kernel = initializers.get(self.W_init)(key_W, (kh, kw, c_in, self.out_channels), dtype)
        params = {"W": kernel.reshape(kh * kw * c_in, self.out_channels)}
        if self.use_bias:
            params["b"] = initializers.get(self.b_init)(key_b, (self.out_channels,), dtype)
        return geometry.out + (self.out_channels,), params

    def _check(self, x: Array, params: Params) -> None:
        check_image_input(self, x)
        check_param_keys(self, params, {"W", "b"} if self.use_bias else {"W"})
        rows = self.kernel_size[0] * self.kernel_size[1] * x.shape[-1]
        if tuple(params["W"].shape) != (rows, self.out_channels):
            raise self._fail(
                f"expects W of shape (kh * kw * c_in, c_out) = ({rows}, {self.out_channels}) for input "
                f"{tuple(x.shape)}, got {tuple(params['W'].shape)}"
            )
        if self.use_bias and tuple(params["b"].shape) != (self.out_channels,):
            raise self._fail(f"expects b of shape ({self.out_channels},), got {tuple(params['b'].shape)}")
        image_geometry(self, x.shape[1:], self.kernel_size, self.stride, self.padding)

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        self._check(x, params)
        return self.network().forward(self.to_network(params), x)

    def input_cotangent(self, params: Params, cache: Cache, dz: Array) -> Array:
        """``dX = col2im(dZ W^T)`` as one transposed convolution (:func:`mnet.layers.windows.transposed_convolution`),
        for ``dz`` with any leading axes (a stack of columns): what the inner network's walk computes, without the
        window gradient ``dZ W^T``. In the promoted dtype of ``dz`` and ``W`` as the product would be; under a policy in
        its compute dtype, accumulated in the parameters', and returned in the dtype of the cached windows, as
        :class:`mnet.Dense` returns its input gradient."""
        record, windows = cache
        kh, kw = self.kernel_size
        W = params["W"]
        kernel = W.reshape(kh, kw, -1, self.out_channels)
        geometry = Geometry.of(tuple(record.shape[1:3]), self.kernel_size, self.stride, self.padding)
        if self.policy is None:  # promoted as the inner walk's product dz W^T promotes (float64 dz, float32 W)
            common = jnp.result_type(dz, kernel)
            return transposed_convolution(dz.astype(common), kernel.astype(common), geometry)
        compute = jnp.dtype(self.policy.compute_dtype)
        dx = transposed_convolution(dz.astype(compute), kernel.astype(compute), geometry, W.dtype)
        return dx.astype(windows.dtype)
