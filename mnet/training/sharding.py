"""Where the training arrays live on a mesh of devices: the batch split over ``"data"``, the parameters replicated,
fully sharded (FSDP) or tensor-parallel (Megatron's column- then row-parallel dense pairs).

Nothing here touches a derivative. The hand-derived step is the same program whatever the layout: ``jax.jit`` is
told where its inputs and outputs live (``in_shardings``/``out_shardings``) and XLA's partitioner inserts the
collectives the layout needs (an all-gather of a sharded weight before the product that reads it, a reduce-scatter
of its gradient, the all-reduce after a row-parallel product), so every layout computes the replicated step's
numbers up to the order of the sums.

The mesh has two axes, ``("data", "model")``. The batch is split over ``"data"``; ``"model"`` has size 1 except for
tensor parallelism, where each ``"model"`` group of devices holds one slice of every paired dense layer:

* ``"replicated"``: every device holds every parameter (plain data parallelism).
* ``"fsdp"``: every parameter with an axis divisible by the data axis' size is split along its largest such axis
  (a Dense ``W`` by rows, a Conv2D kernel by its widest axis), so parameter and optimizer-state bytes per device
  fall by the number of devices; a leaf too small to split (a bias of width 10 over 4 devices) stays replicated.
* ``"tensor"``: consecutive Dense layers of a serial network pair up; the first of a pair is column-parallel
  (``W`` split by columns, ``b`` too), the second row-parallel (``W`` split by rows), so the activation between
  them stays split and one all-reduce follows the pair. A Dense left unpaired, and every other layer, is
  replicated.

The optimizer state follows the parameters: a subtree shaped like the parameters (Adam's moments) gets their
layout, everything else (step counts) is replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mnet.core.devices import make_mesh, place, to_host
from mnet.core.paths import at_path, replaced_at
from mnet.core.walk import units
from mnet.errors import SettingError
from mnet.layers.dense import Dense

LAYOUTS = ("replicated", "fsdp", "tensor")

#: The mesh and the host-to-device placement are :mod:`mnet.core.devices`' (influence spreads its batches the same
#: way); they are named here too, where training reads them.
__all__ = ["LAYOUTS", "follow_parameters", "make_mesh", "parameter_specs", "place", "shardings", "to_host"]


def _fsdp_spec(leaf: Any, parts: int) -> PartitionSpec:
    shape = np.shape(leaf)
    candidates = [axis for axis, size in enumerate(shape) if size % parts == 0 and size >= parts]
    if parts == 1 or not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda a: shape[a])
    return PartitionSpec(*([None] * axis + ["data"]))


def _tensor_roles(denses: list[dict], parts: int) -> list[str]:
    """``"column"``/``"row"`` for each pair of consecutive Dense layers whose shared width splits ``parts`` ways,
    ``""`` (replicated) for the rest."""
    roles = [""] * len(denses)
    for k in range(0, len(denses) - 1, 2):
        width = denses[k]["W"].shape[1]
        if width % parts == 0 and denses[k + 1]["W"].shape[0] == width:
            roles[k], roles[k + 1] = "column", "row"
    return roles


def _tensor_specs(net: Any, params: Any, parts: int, example: Any) -> Any:
    """Every Dense the walk finds (:func:`mnet.core.walk.units`: in serial, residual and parallel blocks, inside a
    convolution or an attention layer), in the order of the params, paired as :func:`_tensor_roles` says; every
    other leaf replicated."""
    dense_paths = [path for path, layer in units(net, params, example) if isinstance(layer, Dense)]
    entries = [at_path(params, path) for path in dense_paths]
    column = {"W": PartitionSpec(None, "model"), "b": PartitionSpec("model")}
    row = {"W": PartitionSpec("model", None), "b": PartitionSpec()}
    specs = jax.tree_util.tree_map(lambda _: PartitionSpec(), params)
    for path, entry, role in zip(dense_paths, entries, _tensor_roles(entries, parts)):
        chosen = {"column": column, "row": row}.get(role, {})
        specs = replaced_at(specs, path, {name: chosen.get(name, PartitionSpec()) for name in entry})
    return specs


def parameter_specs(net: Any, params: Any, layout: str, mesh: Mesh, example: Any = None) -> Any:
    """A ``PartitionSpec`` for every parameter leaf under ``layout`` (one of :data:`LAYOUTS`), a tree like
    ``params``. ``example`` (one input batch, or its ``jax.ShapeDtypeStruct``) is needed by ``"tensor"``, which finds
    the Dense layers by walking the network."""
    if layout not in LAYOUTS:
        raise SettingError(f"parameter layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "replicated":
        return jax.tree_util.tree_map(lambda _: PartitionSpec(), params)
    if layout == "fsdp":
        return jax.tree_util.tree_map(lambda leaf: _fsdp_spec(leaf, mesh.shape["data"]), params)
    if mesh.shape["model"] == 1:
        raise SettingError("tensor parallelism needs a mesh with more than one device on its 'model' axis")
    if example is None:
        raise SettingError("the tensor layout finds the Dense layers by walking the network: give an example input")
    return _tensor_specs(net, params, mesh.shape["model"], example)


def follow_parameters(tree: Any, params: Any, specs: Any) -> Any:
    """Specs for a tree that holds copies of the parameters' shape (an optimizer state): every subtree with the
    parameters' structure and shapes gets ``specs``, every other leaf is replicated."""
    structure: Any = jax.tree_util.tree_structure(params)
    shapes = [np.shape(leaf) for leaf in jax.tree_util.tree_leaves(params)]

    def like_params(node: Any) -> bool:
        if not structure == jax.tree_util.tree_structure(node):
            return False
        return [np.shape(leaf) for leaf in jax.tree_util.tree_leaves(node)] == shapes

    return jax.tree_util.tree_map(
        lambda node: specs if like_params(node) else PartitionSpec(), tree, is_leaf=like_params
    )


def shardings(mesh: Mesh, specs: Any) -> Any:
    """``NamedSharding``s on ``mesh`` for a tree of ``PartitionSpec``s."""
    return jax.tree_util.tree_map(
        lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda s: isinstance(s, PartitionSpec)
    )
