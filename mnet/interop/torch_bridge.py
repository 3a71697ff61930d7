"""``from_torch``: a ``torch.nn.Sequential`` of the common layers becomes an mnet network with its weights.

The converted network takes what the PyTorch model takes: a batch ``(N, features)``, images ``(N, C, H, W)``
(channels first, PyTorch's NCHW; the network turns them channels last for its convolutions and back where they
end, :mod:`mnet.interop.build`) or token ids ``(N, T)``, and gives the same outputs. Weights become mnet's
layout: a ``Linear``'s ``W = weight.T``, a ``Conv2d``'s OIHW kernel ``(kh * kw * c_in, c_out)`` rows.

Mapped (nested ``Sequential`` too): ``Linear``, ``Conv2d`` (zero padding, no dilation or groups), ``MaxPool2d``,
``AvgPool2d`` (no ceil mode), ``Flatten`` (from dimension 1), ``LayerNorm`` and ``RMSNorm`` over the last axis,
``Embedding``, ``Identity``, ``Dropout`` (as the identity: the converted network is the model in ``eval()``), and
``ReLU``, ``Sigmoid``, ``Tanh``, ``GELU``, ``SiLU``, ``ELU``, ``LeakyReLU``, ``Softplus`` (``beta=1``) and
``Softmax`` over the last axis. Anything else raises :class:`mnet.interop.build.UnsupportedLayer` naming it.
"""

from __future__ import annotations

from typing import Any

from mnet.interop.build import Builder, activation, unsupported
from mnet.layers.combinators import Serial

_ACTIVATIONS = {"ReLU": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "SiLU": "silu", "Identity": "identity"}


def _numpy(tensor: Any) -> Any:
    return None if tensor is None else tensor.detach().cpu().numpy()


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _padding(module: Any) -> Any:
    padding = module.padding
    if isinstance(padding, str):
        return padding.upper()
    top, left = _pair(padding)
    return ((top, top), (left, left))


def _convolution(builder: Builder, module: Any, where: str) -> None:
    if module.groups != 1 or _pair(module.dilation) != (1, 1) or module.padding_mode != "zeros":
        raise unsupported("from_torch", where, module, "only groups=1, dilation=1 and zero padding are mapped")
    builder.conv2d(_numpy(module.weight), _numpy(module.bias), _pair(module.stride), _padding(module))


def _pooling(builder: Builder, module: Any, where: str, kind: str) -> None:
    dilation = getattr(module, "dilation", 1)
    if module.ceil_mode or _pair(dilation) != (1, 1) or getattr(module, "divisor_override", None):
        raise unsupported("from_torch", where, module, "ceil_mode, dilation and divisor_override are not mapped")
    window = _pair(module.kernel_size)
    stride = window if module.stride is None else _pair(module.stride)
    top, left = _pair(module.padding)
    options = {"count_include_pad": module.count_include_pad} if kind == "avg" else {}
    builder.pool(kind, window, stride, ((top, top), (left, left)), **options)


def _normalization(builder: Builder, module: Any, where: str, torch: Any) -> None:
    shape = tuple(module.normalized_shape)
    if len(shape) != 1:
        raise unsupported("from_torch", where, module, f"normalized_shape {shape}: only the last axis is mapped")
    weight = _numpy(module.weight) if module.weight is not None else None
    if isinstance(module, torch.nn.LayerNorm):
        builder.layer_norm(weight, _numpy(module.bias), module.eps, shape[0])
    else:
        # torch's RMSNorm with eps=None adds the input dtype's machine epsilon
        eps = module.eps if module.eps is not None else float(torch.finfo(module.weight.dtype).eps)
        builder.rms_norm(weight, eps, shape[0])


def _elementwise(builder: Builder, module: Any, where: str, torch: Any) -> bool:
    nn, name = torch.nn, type(module).__name__
    if type(module).__module__.startswith("torch.nn") and name in _ACTIVATIONS:
        builder.add(activation(_ACTIVATIONS[name]))
    elif isinstance(module, nn.Dropout):
        builder.add(activation("identity"))
    elif isinstance(module, nn.GELU):
        builder.add(activation("gelu", approximate=module.approximate == "tanh"))
    elif isinstance(module, nn.ELU):
        builder.add(activation("elu", alpha=module.alpha))
    elif isinstance(module, nn.LeakyReLU):
        builder.add(activation("leaky_relu", slope=module.negative_slope))
    elif isinstance(module, nn.Softplus) and module.beta == 1:
        builder.add(activation("softplus"))
    elif isinstance(module, nn.Softmax) and module.dim in (-1, None):
        builder.add(activation("softmax"))
    else:
        return False
    return True


def _convert(builder: Builder, module: Any, where: str, torch: Any) -> None:
    nn = torch.nn
    if isinstance(module, nn.Sequential):
        for index, child in enumerate(module):
            _convert(builder, child, f"{where}[{index}]", torch)
    elif isinstance(module, nn.Linear):
        builder.linear(_numpy(module.weight), _numpy(module.bias))
    elif isinstance(module, nn.Conv2d):
        _convolution(builder, module, where)
    elif isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
        _pooling(builder, module, where, "max" if isinstance(module, nn.MaxPool2d) else "avg")
    elif isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise unsupported("from_torch", where, module, "only Flatten(start_dim=1, end_dim=-1) is mapped")
        builder.flatten()
    elif isinstance(module, nn.LayerNorm | nn.RMSNorm):
        _normalization(builder, module, where, torch)
    elif isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            raise unsupported("from_torch", where, module, "max_norm renormalises rows as it looks them up")
        builder.embedding(_numpy(module.weight))
    elif not _elementwise(builder, module, where, torch):
        raise unsupported("from_torch", where, module)


def from_torch(module: Any, dtype: Any = None) -> tuple[Serial, tuple]:
    """An mnet network computing what ``module`` computes in ``eval()`` mode, with its weights.

    Arguments:
        module: a ``torch.nn.Sequential`` (or one supported layer) of the layers listed in this module's text.
        dtype: the dtype of the converted params (default: the tensors' own; float64 weights need JAX's x64).

    Returns:
        ``(net, params)``: ``net.forward(params, x)[0]`` equals ``module(x)`` for ``x`` in PyTorch's layout.

    Raises:
        UnsupportedLayer: a layer no mnet layer computes, named with its position (``model[2]``).
    """
    import torch  # optional: the bridge's own dependency (pip install torch)

    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_torch: expects a torch.nn.Module, got {type(module).__name__}")
    builder = Builder("from_torch", dtype)
    _convert(builder, module, "model", torch)
    return builder.network()
