"""A network as data: a declarative description of any network of mnet's layers, and the network built back from it.

A trained model should be usable without the script that built it, and a checkpoint must never hold code or a
pickle. So a network is described as plain JSON: each layer is ``{"layer": "Dense", "out_dim": 10, ...}`` (its class
name and the constructor fields that differ from their defaults), a combinator holds its layers as a list, and a
mixed-precision policy is ``{"layer": "Policy", ...}``. Building reads nothing but that: a class name must be one of
mnet's own layers (:data:`LAYER_CLASSES`), every field must be a field of that class, and every value JSON data, so
a description can name no module, no function and no attribute. A user's own layer class has no description; an
initialiser given as a function (not a name) is not recorded, since it does not change what a trained network
computes.

    >>> description = describe_network(mnet.serial(mnet.Dense(8), mnet.Relu(), mnet.Dense(2)))
    >>> build_network(description) == mnet.serial(mnet.Dense(8), mnet.Relu(), mnet.Dense(2))
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mnet.errors import KindError, SettingError
from mnet.layers.attention import AttentionCore, BlockwiseAttentionCore, HeadLayout, MultiHeadSelfAttention
from mnet.layers.combinators import Parallel, Residual, Serial
from mnet.layers.convolution import Conv2D
from mnet.layers.dense import Dense, Policy
from mnet.layers.dropout import Dropout
from mnet.layers.elementwise import Elu, Gelu, Identity, LeakyRelu, Relu, Sigmoid, Silu, Softmax, Softplus, Tanh
from mnet.layers.embedding import Embedding
from mnet.layers.gated import GatedMLP, GatedProduct
from mnet.layers.normalization import BatchNorm, LayerNorm, RMSNorm
from mnet.layers.pooling import AvgPool2D, MaxPool2D
from mnet.layers.recurrent import GRU, LSTM, RNN, LastStep
from mnet.layers.shape import Flatten, Reshape
from mnet.layers.tied import Tied, Unembed
from mnet.layers.windows import Windows

#: The classes a description may name: mnet's layers and the mixed-precision policy, by class name.
LAYER_CLASSES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        AttentionCore, AvgPool2D, BatchNorm, BlockwiseAttentionCore, Conv2D, Dense, Dropout, Elu, Embedding,
        Flatten, GatedMLP, GatedProduct, Gelu, GRU, HeadLayout, Identity, LastStep, LayerNorm, LeakyRelu, LSTM,
        MaxPool2D, MultiHeadSelfAttention, Parallel, Policy, Relu, Reshape, Residual, RMSNorm, RNN, Serial, Sigmoid,
        Silu, Softmax, Softplus, Tanh, Tied, Unembed, Windows,
    )
}  # fmt: skip

_SCALARS = (bool, int, float, str, type(None))


def describe_network(net: Any) -> dict:
    """The JSON description of ``net``.

    Arguments:
        net: a network of mnet's layers (any nesting of combinators).

    Returns:
        A dict of JSON data (see the module docstring), which :func:`build_network` turns back into ``net``.

    Raises:
        KindError: ``net`` holds a layer that is not one of mnet's (a user's class), naming it.
    """
    described = _encode(net, "network")
    if not isinstance(described, dict):
        raise KindError(f"describe_network: {net!r} is not a layer")
    return described


def build_network(description: Any) -> Any:
    """The network a description of :func:`describe_network` stands for.

    Arguments:
        description: the JSON data.

    Returns:
        The network.

    Raises:
        SettingError: an unknown class, an unknown field or a value that is not plain data, naming where in the
            description it sits (``layers[2].out_dim``).
    """
    if not isinstance(description, dict):
        raise SettingError(f"build_network: the network is {description!r:.80}, not a layer description")
    return _decode(description, "network")


def _encode(value: Any, where: str) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, tuple | list):
        return [_encode(item, f"{where}[{index}]") for index, item in enumerate(value)]
    cls = type(value)
    if not (dataclasses.is_dataclass(value) and LAYER_CLASSES.get(cls.__name__) is cls):
        raise KindError(
            f"describe_network: {where} is {value!r:.80} ({cls.__module__}.{cls.__qualname__}), which is not one of "
            "mnet's layers: a description holds no code, so a network with a layer of your own has none"
        )
    fields: dict[str, Any] = {"layer": cls.__name__}
    for field in dataclasses.fields(value):
        if not field.init:
            continue
        item = getattr(value, field.name)
        if field.default is not dataclasses.MISSING and item == field.default:
            continue
        if callable(item) and field.name.endswith("_init"):
            continue  # an initialiser given as a function: it does not change what a trained network computes
        fields[field.name] = _encode(item, f"{where}.{field.name}")
    return fields


def _decode(value: Any, where: str) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, list):
        return tuple(_decode(item, f"{where}[{index}]") for index, item in enumerate(value))
    if not isinstance(value, dict) or not isinstance(value.get("layer"), str):
        raise SettingError(f"build_network: {where} is {value!r:.80}, not a layer description")
    cls = LAYER_CLASSES.get(value["layer"])
    if cls is None:
        raise SettingError(f"build_network: {where} names {value['layer']!r:.40}, which is not one of mnet's layers")
    names = {field.name for field in dataclasses.fields(cls) if field.init}
    unknown = sorted(set(value) - names - {"layer"})
    if unknown:
        raise SettingError(f"build_network: {where} ({cls.__name__}) has no field {', '.join(unknown)}")
    arguments = {name: _decode(item, f"{where}.{name}") for name, item in value.items() if name != "layer"}
    try:
        return cls(**arguments)
    except (TypeError, ValueError) as error:
        raise SettingError(f"build_network: {where} ({cls.__name__}): {error}") from None
