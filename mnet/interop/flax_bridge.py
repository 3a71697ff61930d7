"""``from_flax``: a Flax NNX model becomes an mnet network with its weights.

Flax computes on batches and lays images out ``(N, H, W, C)``, as mnet does, and keeps a linear layer's kernel as
``(in, out)`` and a convolution's as HWIO: the converted network takes the same inputs and its weights are Flax's,
a convolution's kernel reshaped to ``(kh * kw * c_in, c_out)`` rows (through the OIHW form
:mod:`mnet.interop.build` takes from every framework).

Mapped: ``nnx.Sequential`` (nested too); ``nnx.Linear``; ``nnx.Conv`` in 2-D (zero padding, no dilation, groups
or mask); ``nnx.LayerNorm`` and ``nnx.RMSNorm`` over the last axis; ``nnx.Embed``; ``nnx.MultiHeadAttention`` as
self-attention (what it computes in ``Sequential``, given one input) without ``normalize_qk``, dropout or
``decode``, and with softmax attention as its ``attention_fn`` (the default's; note that Flax's default
``nnx.dot_product_attention`` rounds to about 1e-7 even in float64, mnet's attention does not); ``nnx.Dropout`` (as the identity: the model in evaluation mode); and as functions in the sequence, the
jax activations (``nnx.relu``, ``nnx.gelu``, ...; :func:`mnet.interop.build.function_layer`), a flatten
(``lambda x: x.reshape(x.shape[0], -1)``) and ``functools.partial(nnx.max_pool | nnx.avg_pool, window_shape,
strides, padding)``. Anything else raises :class:`mnet.interop.build.UnsupportedLayer` naming it.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from mnet.interop.build import Builder, activation, function_layer, unsupported
from mnet.layers.combinators import Serial


def _value(variable: Any) -> Any:
    return None if variable is None else np.asarray(variable[...])


def _conv(builder: Builder, module: Any, where: str) -> None:
    kernel = _value(module.kernel)
    plain = all(np.all(np.asarray(d) == 1) for d in (module.kernel_dilation, module.input_dilation))
    if kernel.ndim != 4 or not plain or module.feature_group_count != 1 or module.mask is not None:
        raise unsupported("from_flax", where, module, "only 2-D convolutions without dilation, groups or mask")
    padding = module.padding
    if isinstance(padding, str) and padding not in ("SAME", "VALID"):
        raise unsupported("from_flax", where, module, f"padding {padding!r} is not mapped")
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    elif not isinstance(padding, str):
        padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    strides = (module.strides,) * 2 if isinstance(module.strides, int) else tuple(module.strides)
    builder.conv2d(kernel.transpose(3, 2, 0, 1), _value(module.bias), strides, padding)


def _attention(builder: Builder, module: Any, where: str) -> None:
    if module.normalize_qk or module.decode or module.dropout_rate:
        raise unsupported("from_flax", where, module, "normalize_qk, decode and dropout are not mapped")
    heads = module.num_heads
    projections = []
    for part in (module.query, module.key, module.value):  # kernels (in, heads, head_dim): weight (out, in)
        kernel = _value(part.kernel)
        bias = _value(part.bias)
        projections.append((kernel.reshape(kernel.shape[0], -1).T, None if bias is None else bias.reshape(-1)))
    out = _value(module.out.kernel)  # (heads, head_dim, out)
    projections.append((out.reshape(-1, out.shape[-1]).T, _value(module.out.bias)))
    builder.self_attention(heads, projections)


def _pool(builder: Builder, fn: functools.partial, where: str, nnx: Any) -> None:
    options = dict(fn.keywords)
    window = options.pop("window_shape", fn.args[0] if fn.args else None)
    strides = options.pop("strides", None) or window
    padding = options.pop("padding", "VALID")
    kind = "max" if fn.func is nnx.max_pool else "avg"
    extra = {"count_include_pad": options.pop("count_include_pad", True)} if kind == "avg" else {}
    if window is None or len(window) != 2 or options or len(fn.args) > 1:
        raise unsupported("from_flax", where, fn, f"{kind}_pool needs a 2-D window_shape (and no other options)")
    if not isinstance(padding, str):
        padding = tuple(tuple(p) for p in padding)
    builder.pool(kind, window, strides, padding, **extra)


def _norm(builder: Builder, module: Any, where: str, nnx: Any) -> None:
    if module.reduction_axes not in (-1, (-1,)) or module.feature_axes not in (-1, (-1,)):
        raise unsupported("from_flax", where, module, "only normalisation over the last axis is mapped")
    width = module.num_features
    if isinstance(module, nnx.RMSNorm):
        builder.rms_norm(_value(module.scale), module.epsilon, width)
    else:
        builder.layer_norm(_value(module.scale), _value(module.bias), module.epsilon, width)


def _convert(builder: Builder, module: Any, where: str, nnx: Any) -> None:
    if isinstance(module, nnx.Sequential):
        for index, child in enumerate(module.layers):
            _convert(builder, child, f"{where}.layers[{index}]", nnx)
    elif isinstance(module, nnx.Linear):
        builder.linear(_value(module.kernel).T, _value(module.bias))
    elif isinstance(module, nnx.Conv):
        _conv(builder, module, where)
    elif isinstance(module, nnx.LayerNorm | nnx.RMSNorm):
        _norm(builder, module, where, nnx)
    elif isinstance(module, nnx.Embed):
        builder.embedding(_value(module.embedding))
    elif isinstance(module, nnx.MultiHeadAttention):
        _attention(builder, module, where)
    elif isinstance(module, nnx.Dropout):
        builder.add(activation("identity"))
    elif isinstance(module, functools.partial) and module.func in (nnx.max_pool, nnx.avg_pool):
        _pool(builder, module, where, nnx)
    elif callable(module) and not isinstance(module, nnx.Module):
        function_layer(builder, module, where, module)
    else:
        raise unsupported("from_flax", where, module)


def from_flax(module: Any, dtype: Any = None) -> tuple[Serial, tuple]:
    """An mnet network computing what the Flax NNX ``module`` computes (in evaluation mode), with its weights.

    Arguments:
        module: an ``nnx.Sequential`` (or one supported layer) of the layers listed in this module's text.
        dtype: the dtype of the converted params (default: the module's own).

    Returns:
        ``(net, params)``: ``net.forward(params, x)[0]`` equals ``module(x)``.

    Raises:
        UnsupportedLayer: a layer no mnet layer computes, named with its position (``model.layers[2]``).
    """
    from flax import nnx  # optional: the bridge's own dependency (pip install flax)

    if not isinstance(module, nnx.Module):
        raise TypeError(f"from_flax: expects a flax.nnx.Module, got {type(module).__name__}")
    builder = Builder("from_flax", dtype, channels_first=False)
    _convert(builder, module, "model", nnx)
    return builder.network()
