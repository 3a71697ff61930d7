"""Model state beside the params: where BatchNorm's running statistics live.

A layer that keeps state (``stateful = True``: BatchNorm) has no state inside its params and never changes any in
place. The state is a pytree shaped like the params down to each layer's entry: a stateful layer's entry is its
state (``{"mean", "var"}``), every other entry ``()``; so a ``serial``'s state is a tuple with one entry per layer,
like its params. It travels as an argument:

* ``net.forward(params, x, state=state, train=False)`` runs in evaluation mode (running statistics);
  ``train=True``, or no state at all, in training mode (the batch's statistics);
* :func:`update_state` reads a training pass's cache and returns the next state;
* :func:`init_state` makes the first one.

Both functions are walks (:func:`mnet.core.walk.walk`) that pass every layer without state by whole, so every
combinator (serial, residual, parallel) carries state without a line of its own beyond handing each child its
entry in ``forward``. A network without stateful layers is untouched: its calls are exactly as before.
"""

from __future__ import annotations

from typing import Any

import jax

from mnet.core.protocol import Params, call_forward, input_dtype, is_stateful
from mnet.core.walk import Quantity, walk

State = Any


class _StateWalk(Quantity):
    """A walk over the stateful layers alone: their rule ``rule(tree_entry, cache)`` gives their entry; every other
    layer is passed by whole with ``()``. Nothing is carried (the carried value stays None)."""

    def __init__(self, rule: str):
        self.rule = rule

    def skips(self, layer: Any) -> bool:
        return not is_stateful(layer)

    def at_unit(self, layer, params, caches, carried):
        return getattr(layer, self.rule)(params, caches[0]), carried

    def fork(self, value):
        return value

    def split(self, value, bounds):
        return [value] * (len(bounds) + 1)

    def join(self, a, b):
        return a


_INITIAL_STATE = _StateWalk("initial_state")
_UPDATED_STATE = _StateWalk("updated_state")


def init_state(net: Any, params: Params, input_shape: tuple[int, ...], dtype: Any = None) -> State:
    """The first state of ``net``: a pytree like ``params`` down to each layer's entry, the running statistics of
    every BatchNorm (mean 0, variance 1) and ``()`` elsewhere. A network without stateful layers gets ``()``.

    Arguments:
        net: the network.
        params: its params (from ``net.init``).
        input_shape: one example's shape (no batch axis), as given to ``net.init``.
        dtype: the input dtype (default: the params' floating dtype; integer ids for a network that takes them).

    Returns:
        The state pytree (nothing is computed: the network's caches are only traced for their shapes).
    """
    if not is_stateful(net):
        return ()
    if dtype is None:
        dtype = input_dtype(net, params)
    example = jax.ShapeDtypeStruct((2,) + tuple(input_shape), dtype)
    cache = jax.eval_shape(lambda p, x: call_forward(net, p, x)[1], params, example)
    return walk(net, _INITIAL_STATE, params, (cache,), (None,))[0]


def update_state(net: Any, state: State, cache: Any) -> State:
    """The state after a training-mode forward pass whose cache is ``cache`` (each BatchNorm's running statistics
    moved towards its batch statistics by its momentum); after an evaluation pass, the state unchanged.

    Arguments:
        net: the network.
        state: the state before the pass (from :func:`init_state` or the last update).
        cache: the cache of ``net.forward(params, x, state=state, train=True)``.

    Returns:
        The new state, a new pytree (``state`` is not modified).
    """
    if not is_stateful(net):
        return state
    return walk(net, _UPDATED_STATE, state, (cache,), (None,))[0]
