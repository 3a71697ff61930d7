"""``from_equinox``: an Equinox model built from ``eqx.nn`` layers becomes an mnet network with its weights.

An Equinox module maps one example; the converted network maps a batch of them (``net.forward(params, xs)`` is
``jax.vmap(model)(xs)``). Images are channels first, ``(C, H, W)`` per example, as Equinox's convolutions read them
(the network turns them channels last for its own and back where they end, :mod:`mnet.interop.build`).

Mapped: ``Sequential``; ``Linear``; ``MLP`` (its linear layers and activations); ``Conv2d`` (zero padding, no
dilation or groups); ``MaxPool2d`` and ``AvgPool2d`` (no ``use_ceil``); ``LayerNorm`` over the last axis;
``RMSNorm`` (with its shift, ``use_bias``, Equinox's default); ``Embedding`` (then an
example is a token id, or ids of any shape); ``MultiheadAttention`` as self-attention ``mha(x, x, x)`` on ``(T,
D)`` examples; ``Identity``; ``Dropout`` (as the identity, the model in inference mode); ``Lambda`` of an activation
(``jax.nn.relu``, ``jax.nn.gelu`` and the others of :func:`mnet.interop.build.activation`, also through
``functools.partial``) or of ``jnp.ravel`` (a flatten). Anything else raises
:class:`mnet.interop.build.UnsupportedLayer` naming it.
"""

from __future__ import annotations

from typing import Any

from mnet.interop.build import Builder, activation, function_layer, unsupported
from mnet.layers.combinators import Serial


def _mlp(builder: Builder, module: Any, where: str) -> None:
    for index, layer in enumerate(module.layers):
        builder.linear(layer.weight, layer.bias)
        last = index == len(module.layers) - 1
        function_layer(builder, module.final_activation if last else module.activation, where, module)


def _attention(builder: Builder, module: Any, where: str) -> None:
    if module.qk_size != module.vo_size or not module.query_size == module.key_size == module.value_size:
        raise unsupported("from_equinox", where, module, "self-attention needs qk_size = vo_size and one input size")
    projections = [(p.weight, p.bias) for p in (module.query_proj, module.key_proj, module.value_proj)]
    builder.self_attention(module.num_heads, [*projections, (module.output_proj.weight, module.output_proj.bias)])


def _pool(builder: Builder, module: Any, where: str, kind: str) -> None:
    if module.use_ceil or len(module.kernel_size) != 2:
        raise unsupported("from_equinox", where, module, "only 2-D pooling without use_ceil is mapped")
    options = {"count_include_pad": True} if kind == "avg" else {}
    builder.pool(kind, module.kernel_size, module.stride, tuple(module.padding), **options)


def _convert(builder: Builder, module: Any, where: str, eqx: Any) -> None:
    nn = eqx.nn
    if isinstance(module, nn.Sequential):
        for index, child in enumerate(module.layers):
            _convert(builder, child, f"{where}.layers[{index}]", eqx)
    elif isinstance(module, nn.Linear):
        if module.in_features == "scalar" or module.out_features == "scalar":
            raise unsupported("from_equinox", where, module, "scalar inputs and outputs are not mapped")
        builder.linear(module.weight, module.bias)
    elif isinstance(module, nn.MLP):
        _mlp(builder, module, where)
    elif isinstance(module, nn.Conv2d):
        if module.groups != 1 or tuple(module.dilation) != (1, 1) or module.padding_mode != "ZEROS":
            raise unsupported("from_equinox", where, module, "only groups=1, dilation=1 and zero padding are mapped")
        padding = module.padding if isinstance(module.padding, str) else tuple(map(tuple, module.padding))
        if padding == "SAME_LOWER":
            raise unsupported("from_equinox", where, module, "padding SAME_LOWER is not mapped")
        builder.conv2d(module.weight, module.bias, module.stride, padding)
    elif isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
        _pool(builder, module, where, "max" if isinstance(module, nn.MaxPool2d) else "avg")
    elif isinstance(module, nn.LayerNorm):
        if len(module.shape) != 1:
            raise unsupported("from_equinox", where, module, f"shape {module.shape}: only the last axis is mapped")
        builder.layer_norm(module.weight, module.bias, module.eps, module.shape[0])
    elif isinstance(module, nn.RMSNorm):
        if len(module.shape) != 1:
            raise unsupported("from_equinox", where, module, f"shape {module.shape}: only the last axis is mapped")
        builder.rms_norm(module.weight, module.eps, module.shape[0], module.bias)
    elif isinstance(module, nn.Embedding):
        builder.embedding(module.weight)
    elif isinstance(module, nn.MultiheadAttention):
        _attention(builder, module, where)
    elif isinstance(module, nn.Identity | nn.Dropout):
        builder.add(activation("identity"))
    elif isinstance(module, nn.Lambda):
        function_layer(builder, module.fn, where, module)
    else:
        raise unsupported("from_equinox", where, module)


def from_equinox(module: Any, dtype: Any = None) -> tuple[Serial, tuple]:
    """An mnet network computing ``jax.vmap(module)``, with the module's weights.

    Arguments:
        module: an ``eqx.nn.Sequential`` (or one supported layer) of the layers listed in this module's text.
        dtype: the dtype of the converted params (default: the module's own).

    Returns:
        ``(net, params)``: ``net.forward(params, xs)[0]`` equals ``jax.vmap(module)(xs)``.

    Raises:
        UnsupportedLayer: a layer no mnet layer computes, named with its position (``model.layers[2]``).
    """
    import equinox as eqx  # optional: the bridge's own dependency (pip install equinox)

    if not isinstance(module, eqx.Module):
        raise TypeError(f"from_equinox: expects an equinox.Module, got {type(module).__name__}")
    builder = Builder("from_equinox", dtype, batched=False)
    _convert(builder, module, "model", eqx)
    return builder.network()
