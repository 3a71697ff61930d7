"""A trained model from its checkpoint alone: what :func:`mnet.fit` records of the model beside its parameters, and
the model read back from that record, with no script, no code and no pickle (``mnet eval``, ``mnet predict``).

The record is plain JSON in the checkpoint's metadata (whose checksum refuses an edited file): the network's
description (:mod:`mnet.layers.architecture`), one example's shape and dtype, the loss by name, and the per-feature
standardisation the data loaders applied, so that new raw inputs are scaled as the training data were.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mnet import losses
from mnet.core.protocol import Params, init_layer, is_stateful
from mnet.core.state import init_state
from mnet.errors import CheckpointError, DataError, KindError, MnetError
from mnet.layers.architecture import build_network, describe_network
from mnet.training import checkpoint
from mnet.training.data import Dataset, prepared_inputs


def model_record(net: Any, loss: losses.Loss, data: Dataset) -> dict | None:
    """What a checkpoint keeps of the model to be used alone; None for a network of a user's own layers or a loss
    that has no name (a checkpoint of those still resumes, but cannot be evaluated without the script)."""
    try:
        architecture = describe_network(net)
    except KindError:
        return None
    if losses.BY_NAME.get(getattr(loss, "name", "")) is not loss:
        return None
    scaling = data.standardisation
    return {
        "architecture": architecture,
        "example_shape": list(data.example_shape),
        "input_dtype": "int32" if np.issubdtype(np.asarray(data.x_train).dtype, np.integer) else "float32",
        "loss": loss.name,
        "classes": int(data.num_classes),
        "standardisation": None if scaling is None else [np.asarray(part).tolist() for part in scaling],
    }


@dataclass(frozen=True)
class Trained:
    """A model read back from a checkpoint: the network, its loss, parameters and model state (``()`` without
    BatchNorm), one example's shape and dtype, and the training data's standardisation (None for token ids)."""

    net: Any
    loss: losses.Loss
    params: Params
    state: Any
    example_shape: tuple[int, ...]
    input_dtype: str
    standardisation: tuple[np.ndarray, np.ndarray] | None
    metadata: dict

    def prepare(self, x: Any, where: str) -> np.ndarray:
        """Raw inputs as the network takes them: checked against the example shape and dtype, then standardised as
        the training data were. Raises :class:`mnet.errors.DataError` naming ``where``."""
        x = prepared_inputs(x, self.example_shape, self.input_dtype, self.standardisation, where)
        vocab = getattr(self.net, "input_vocab", None)
        if vocab is not None and (x.min() < 0 or x.max() >= vocab):
            raise DataError(f"{where}: token ids must lie in [0, {vocab}), found {int(x.min())}..{int(x.max())}")
        return x


def load_trained(path: str | Path) -> Trained:
    """The model a training checkpoint holds, built from its description alone.

    Raises:
        CheckpointError: the file is no training checkpoint of :func:`mnet.fit`, holds no description (a user's
            network), or its description or arrays do not make a network (an edited file).
    """
    meta = checkpoint.read_metadata(path)
    record = meta.get("model") if isinstance(meta, dict) else None
    if not isinstance(record, dict):
        raise CheckpointError(
            f"{path}: holds no description of its network (not written by mnet.fit, or a network of a user's own "
            "layers), so it cannot be used without the script that built it"
        )
    try:
        net = build_network(record["architecture"])
        loss = losses.get(record["loss"])
        shape, dtype = tuple(int(n) for n in record["example_shape"]), str(record["input_dtype"])
        _, like = init_layer(net, jax.random.key(0), shape)
        state_like = init_state(net, like, shape) if is_stateful(net) else ()
    except (MnetError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its network description does not make a network ({error})") from None
    params, _ = checkpoint.read_entry(path, 0, like)
    state = checkpoint.read_entry(path, 2, state_like)[0] if is_stateful(net) else ()
    scaling = record.get("standardisation")
    standardisation = None if scaling is None else (np.asarray(scaling[0]), np.asarray(scaling[1]))
    return Trained(net, loss, params, state, shape, dtype, standardisation, meta)
