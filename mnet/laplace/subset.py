"""Which weights the Laplace posterior is over: all of them, or the last layer's alone (its inputs, the features of
the layers before it, held fixed at ``theta*``), the "last-layer Laplace" of Kristiadi et al. (2020) and of
laplace-torch's ``subset_of_weights="last_layer"``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from mnet.core.chunks import chunks
from mnet.core.protocol import Array, Params, call_forward, has_params
from mnet.errors import SettingError
from mnet.laplace.structure import chunk_of
from mnet.layers.combinators import Serial, serial

SUBSETS = ("all", "last_layer")


@partial(jax.jit, static_argnums=(0,))
def _apply(body: Any, params: Params, x: Array, mask: Array | None) -> Array:
    return call_forward(body, params, x, mask=mask)[0]


@dataclass(frozen=True)
class Features:
    """The frozen layers of a last-layer Laplace, ``body`` at its params: their outputs are the inputs of the network
    the posterior is over."""

    body: Any
    params: Params

    def __call__(self, x: Array, batch_size: int, mask: Array | None = None) -> Array:
        """The features of ``x`` (under its padding ``mask``), ``batch_size`` examples per compiled call."""
        return jnp.concatenate(
            [_apply(self.body, self.params, x[part], chunk_of(mask, part)) for part in chunks(x.shape[0], batch_size)]
        )


def split_last_layer(net: Any, params: Params) -> tuple[Features, Any, Params]:
    """``(features, head, head_params)``: ``net`` (a :func:`mnet.serial`) cut before its last layer with parameters;
    the head is that layer and the parameterless layers after it (a softmax's logits stay the head's outputs)."""
    if not isinstance(net, Serial):
        raise SettingError(
            f"laplace(subset='last_layer') needs a network built by mnet.serial, whose last layer it can cut off; got "
            f"{net!r}"
        )
    with_params = [index for index, entry in enumerate(params) if has_params(entry)]
    if not with_params:
        raise SettingError(f"laplace(subset='last_layer'): {net!r} has no layer with parameters")
    last = with_params[-1]
    if last == 0:
        raise SettingError(
            f"laplace(subset='last_layer'): the last layer with parameters, {net.layers[0]!r} at position [0], is the "
            "network's first, so no features precede it (a read-out tied to the embedding shares the first layer's "
            "table); use subset='all'"
        )
    features = Features(serial(*net.layers[:last]), tuple(params[:last]))
    return features, serial(*net.layers[last:]), tuple(params[last:])
