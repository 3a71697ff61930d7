"""Devices: the ``("data", "model")`` mesh a computation is spread over, and host values placed on it as global
arrays (rows split over ``"data"``, or replicated) and read back whole.

Nothing here touches a derivative: a jitted program told where its inputs live lets XLA's partitioner insert the
collectives (the all-reduce of a mean over a batch split across devices), so a computation on the mesh gives the
single device's numbers up to the order of the sums. Training (:mod:`mnet.training.sharding`) and influence
(:func:`mnet.influence`) both spread their batches this way.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mnet.errors import SettingError


def make_mesh(devices: int, model: int = 1) -> Mesh:
    """A ``("data", "model")`` mesh over the first ``devices`` of ``jax.devices()`` (every process's devices, once
    :func:`mnet.distributed.initialize` has run; 0 means all of them), ``model`` of them per tensor-parallel group.

    Raises:
        ValueError: more devices asked for than there are, or ``model`` does not divide them.
    """
    available = jax.devices()
    count = len(available) if devices == 0 else devices
    if not 1 <= count <= len(available):
        raise SettingError(
            f"asked for {devices} devices but only {len(available)} are available "
            f"({available[0].platform}); on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N adds more"
        )
    if model < 1 or count % model:
        raise SettingError(f"the {count} devices cannot form tensor-parallel groups of {model}")
    return Mesh(np.array(available[:count]).reshape(count // model, model), ("data", "model"))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device of ``mesh`` holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def rows_sharding(mesh: Mesh, rows: int) -> NamedSharding:
    """Where an array of ``rows`` examples lives on ``mesh``: its leading axis split over ``"data"`` when the rows
    divide evenly, replicated (every device computes it whole) when they do not."""
    if rows % mesh.shape["data"]:
        return replicated(mesh)
    return NamedSharding(mesh, PartitionSpec("data"))


def place(tree: Any, where: Any) -> Any:
    """Global arrays laid out as ``where`` (a tree of shardings, or one sharding for every leaf), built from host
    values that every process holds alike: each process fills only its own devices' shards. None stays None."""

    def one(leaf: Any, sharding: Any) -> jax.Array:
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    if isinstance(where, NamedSharding):
        return jax.tree_util.tree_map(lambda leaf: one(leaf, where), tree)
    return jax.tree_util.tree_map(one, tree, where)


def to_host(tree: Any) -> Any:
    """Every leaf as a NumPy array holding its whole value, on every process (an all-gather across processes where a
    leaf's shards live on other processes' devices)."""

    def one(leaf: Any) -> np.ndarray:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf)

    return jax.tree_util.tree_map(one, tree)
