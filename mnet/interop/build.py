"""From another framework's layers to mnet's, once for every bridge.

Equinox, Flax NNX and PyTorch store a linear layer's weight as ``(out, in)`` and a convolution's as ``(out, in, kh,
kw)``, and PyTorch and Equinox read images channels first, ``(C, H, W)`` per example; mnet computes ``x W`` with
``W: (in, out)``, and its convolutions read ``(H, W, C)`` with ``W: (kh * kw * c_in, c_out)``. A :class:`Builder`
takes the layers in the source's order with their weights in the source's layout and collects mnet layers with
their params:

* ``W = weight.T`` for a linear layer; ``W = weight.transpose(2, 3, 1, 0).reshape(kh * kw * c_in, c_out)`` for a
  convolution (OIHW to HWIO, then flattened as :class:`mnet.Conv2D` keeps it);
* where a channels-first image meets its first convolution or pooling, a :class:`mnet.Transpose` ``(1, 2, 0)``; where
  it leaves them (a flatten, a linear or normalisation layer, the end of the network), ``(2, 0, 1)`` back, so that a
  flatten orders the entries ``(C, H, W)`` as the source does and the outputs come out in the source's layout.

So the converted network takes the same inputs as the source (one batch axis in front of the source's example) and
gives the same outputs. Every layer the builder makes is an ordinary mnet layer: every quantity works on it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnet.core.protocol import LayerProtocol
from mnet.errors import SettingError
from mnet.layers.attention import MultiHeadSelfAttention
from mnet.layers.combinators import Serial, serial
from mnet.layers.convolution import Conv2D
from mnet.layers.dense import Dense
from mnet.layers.elementwise import Elu, Gelu, Identity, LeakyRelu, Relu, Sigmoid, Silu, Softmax, Softplus, Tanh
from mnet.layers.embedding import Embedding
from mnet.layers.normalization import LayerNorm, RMSNorm
from mnet.layers.pooling import AvgPool2D, MaxPool2D
from mnet.layers.shape import Flatten, Transpose

TO_CHANNELS_LAST, TO_CHANNELS_FIRST = (1, 2, 0), (2, 0, 1)


class UnsupportedLayer(SettingError):
    """A layer of the source framework that no mnet layer computes (or one with options mnet has not)."""


def unsupported(source: str, where: str, module: Any, why: str = "") -> UnsupportedLayer:
    """The error naming the source's layer, where it sits in the model, and why it cannot be mapped."""
    name = f"{type(module).__module__.split('.')[0]}.{type(module).__qualname__}"
    detail = f": {why}" if why else ": mnet has no layer that computes it"
    return UnsupportedLayer(f"{source}: {name} at {where} cannot be converted{detail}")


def activation(name: str, **options: Any) -> LayerProtocol:
    """The mnet activation of a name shared by the frameworks (``relu``, ``gelu`` with ``approximate``, ...)."""
    plain = {"relu": Relu, "sigmoid": Sigmoid, "tanh": Tanh, "silu": Silu, "softplus": Softplus, "identity": Identity}
    if name in plain:
        return plain[name]()
    if name == "gelu":
        return Gelu(approximate=bool(options.get("approximate", False)))
    if name == "elu":
        return Elu(float(options.get("alpha", 1.0)))
    if name == "leaky_relu":
        return LeakyRelu(float(options.get("slope", 0.01)))
    if name == "softmax":
        return Softmax()
    raise KeyError(name)


class Builder:
    """The mnet layers and params of a source model, appended in the source's order (see the module's text).

    Arguments:
        source: the bridge's name for error messages (``"from_torch"``).
        dtype: the dtype of every converted parameter (None keeps the source's).
        channels_first: the source's images are ``(C, H, W)`` (PyTorch, Equinox); False for ``(H, W, C)`` (Flax),
            mnet's own layout, which needs no transposes.
        batched: the source's functions take a batch (Flax, PyTorch), not one example (Equinox).
    """

    def __init__(self, source: str, dtype: Any = None, channels_first: bool = True, batched: bool = True):
        self.source, self.dtype, self.channels_first, self.batched = source, dtype, channels_first, batched
        self.layers: list[LayerProtocol] = []
        self.params: list[Any] = []
        self.channels_last = False

    def array(self, weight: Any) -> jnp.ndarray:
        array = np.asarray(weight)
        return jnp.asarray(array, self.dtype or array.dtype)

    def add(self, layer: LayerProtocol, params: Any = ()) -> None:
        self.layers.append(layer)
        self.params.append(params)

    def image(self) -> None:
        """The activations are about to be read as an image: channels last from here on."""
        if self.channels_first and not self.channels_last:
            self.add(Transpose(TO_CHANNELS_LAST))
            self.channels_last = True

    def vectors(self) -> None:
        """The activations are about to be read as the source lays them out: channels first again."""
        if self.channels_last:
            self.add(Transpose(TO_CHANNELS_FIRST))
            self.channels_last = False

    def linear(self, weight: Any, bias: Any | None) -> None:
        """A linear layer ``y = x weight^T + bias`` with ``weight: (out, in)``."""
        self.vectors()
        W = self.array(weight).T
        params = {"W": W} if bias is None else {"W": W, "b": self.array(bias).reshape(-1)}
        self.add(Dense(W.shape[1], use_bias=bias is not None), params)

    def conv2d(self, weight: Any, bias: Any | None, stride: Sequence[int], padding: Any) -> None:
        """A 2-D convolution with an OIHW ``weight`` and a ``(out,)`` (or ``(out, 1, 1)``) ``bias``."""
        self.image()
        kernel = self.array(weight)
        out, c_in, kh, kw = kernel.shape
        W = kernel.transpose(2, 3, 1, 0).reshape(kh * kw * c_in, out)
        params = {"W": W} if bias is None else {"W": W, "b": self.array(bias).reshape(-1)}
        layer = Conv2D(out, (kh, kw), stride=tuple(stride), padding=padding, use_bias=bias is not None)
        self.add(layer, params)

    def pool(self, kind: str, window: Sequence[int], stride: Sequence[int], padding: Any, **options: Any) -> None:
        self.image()
        pool = MaxPool2D if kind == "max" else AvgPool2D
        self.add(pool(tuple(window), stride=tuple(stride), padding=padding, **options))

    def flatten(self) -> None:
        self.vectors()
        self.add(Flatten())

    def layer_norm(self, weight: Any | None, bias: Any | None, eps: float, width: int) -> None:
        """Normalisation over the last axis; an absent ``weight`` or ``bias`` is the identity's ones or zeros."""
        self.vectors()
        gamma = self.array(weight) if weight is not None else jnp.ones(width, self.dtype or jnp.float32)
        beta = self.array(bias) if bias is not None else jnp.zeros(width, gamma.dtype)
        self.add(LayerNorm(float(eps)), {"gamma": gamma.reshape(-1), "beta": beta.reshape(-1)})

    def rms_norm(self, weight: Any | None, eps: float, width: int, bias: Any | None = None) -> None:
        self.vectors()
        gamma = self.array(weight) if weight is not None else jnp.ones(width, self.dtype or jnp.float32)
        params = {"gamma": gamma.reshape(-1)} | ({} if bias is None else {"beta": self.array(bias).reshape(-1)})
        self.add(RMSNorm(float(eps), use_bias=bias is not None), params)

    def embedding(self, weight: Any) -> None:
        table = self.array(weight)
        self.add(Embedding(*table.shape), {"W": table})

    def self_attention(self, num_heads: int, projections: Sequence[tuple[Any, Any | None]]) -> None:
        """Multi-head self-attention from its ``q, k, v, o`` projections' ``(weight, bias or None)``, the weights
        ``(out, in)``; biases absent from some projections (but not all) are zeros."""
        self.vectors()
        use_bias = any(bias is not None for _, bias in projections)
        params = {}
        for name, (weight, bias) in zip("qkvo", projections):
            W = self.array(weight).T
            params[name] = {"W": W}
            if use_bias:
                params[name]["b"] = self.array(bias).reshape(-1) if bias is not None else jnp.zeros(W.shape[1], W.dtype)
        head_dim = params["q"]["W"].shape[1] // num_heads
        out_dim = params["o"]["W"].shape[1]
        self.add(MultiHeadSelfAttention(num_heads, head_dim=head_dim, out_dim=out_dim, use_bias=use_bias), params)

    def network(self) -> tuple[Serial, tuple]:
        """The collected network and its params, the outputs back in the source's layout."""
        self.vectors()
        return serial(*self.layers), tuple(self.params)


# The jax functions that are activations, by the name mnet.interop.build.activation knows them by, with the keyword
# options of each as mnet's: (jax's option, mnet's option, jax's default).
_JAX_ACTIVATIONS: dict[Any, tuple[str, tuple[str, str, Any] | None]] = {
    jax.nn.relu: ("relu", None),
    jax.nn.sigmoid: ("sigmoid", None),
    jnp.tanh: ("tanh", None),
    jax.nn.tanh: ("tanh", None),
    jax.nn.silu: ("silu", None),
    jax.nn.swish: ("silu", None),
    jax.nn.softplus: ("softplus", None),
    jax.nn.softmax: ("softmax", None),
    jax.nn.gelu: ("gelu", ("approximate", "approximate", True)),
    jax.nn.elu: ("elu", ("alpha", "alpha", 1.0)),
    jax.nn.leaky_relu: ("leaky_relu", ("negative_slope", "slope", 0.01)),
}


def function_layer(builder: Builder, fn: Any, where: str, module: Any) -> None:
    """An activation or a flatten given as a function (Equinox's ``Lambda``, Flax's ``Sequential``): the jax
    activations by identity (also through ``functools.partial``), ``lambda x: x`` (an Equinox MLP's default final
    activation) as returning its argument itself, and a flatten (``jnp.ravel`` of an Equinox example, Flax's
    ``lambda x: x.reshape(x.shape[0], -1)``) by its result on a probe of distinct entries."""
    if fn is jnp.ravel or _flattens(fn, builder.batched):
        builder.flatten()
        return
    if _returns_its_argument(fn):
        builder.add(activation("identity"))
        return
    base, keywords = (fn.func, dict(fn.keywords)) if isinstance(fn, functools.partial) else (fn, {})
    name, option = _JAX_ACTIVATIONS.get(base, (None, None))
    if name is None or (isinstance(fn, functools.partial) and fn.args):
        raise unsupported(builder.source, where, module, f"the function {getattr(fn, '__name__', fn)!r} is not mapped")
    options = {}
    if option is not None:
        options[option[1]] = keywords.pop(option[0], option[2])
    if name == "softmax" and keywords.get("axis", -1) in (-1, (-1,)):
        keywords.pop("axis", None)  # mnet's Softmax is over the last axis
    if keywords:
        raise unsupported(builder.source, where, module, f"options {sorted(keywords)} of {name} are not mapped")
    builder.add(activation(name, **options))


def _returns_its_argument(fn: Any) -> bool:
    if isinstance(fn, functools.partial) or fn in _JAX_ACTIVATIONS:
        return False
    probe = jnp.zeros(1)
    try:
        return fn(probe) is probe
    except Exception:  # a function of another kind of input: not the identity
        return False


def _flattens(fn: Any, batched: bool) -> bool:
    """Whether ``fn`` flattens every example (each ``(2, 3, 4)`` example, or a batch of them when ``batched``)."""
    if isinstance(fn, functools.partial) or fn in _JAX_ACTIVATIONS:
        return False
    probe = jnp.arange(48.0).reshape(2, 2, 3, 4) if batched else jnp.arange(24.0).reshape(2, 3, 4)
    try:
        result = fn(probe)
    except Exception:  # a function of another kind of input: not a flatten
        return False
    expected = probe.reshape(2, -1) if batched else probe.reshape(-1)
    return getattr(result, "shape", None) == expected.shape and bool(jnp.all(result == expected))
