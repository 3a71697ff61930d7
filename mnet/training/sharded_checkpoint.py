"""Sharded training checkpoints with orbax-checkpoint (an optional extra: ``pip install mnet[orbax]``): every
process writes only the shards its devices hold, and the checkpoint restores under any process count or layout.

A checkpoint is a directory whose name ends in ``.orbax`` (``fit(checkpoint_path="run.orbax")``); any other path is
the single safetensors file of :mod:`mnet.training.checkpoint`, the default. Inside, orbax's ``CheckpointManager``
keeps one step per saved epoch and only the newest: a new epoch is written beside the old one and committed by a
rename before the old one is deleted, so a crash leaves a whole checkpoint. Each step holds:

* ``state``: the pytree (orbax's ``StandardSave``: arrays with their shardings, each process its own shards);
* ``metadata``: JSON with the tree's leaves (path, shape, dtype) and the free-form metadata (epoch, configuration,
  history, architecture), against which a restore is checked before any array is read.

Restoring reads every array whole into host memory on every process (``RestoreArgs(restore_type=np.ndarray)``), as
a safetensors checkpoint is read; the run then places it in its own layout. So two processes with the parameters
sharded can write, and one process of another device count can resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnet.errors import CheckpointError

SUFFIX = ".orbax"


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` names a sharded (orbax) checkpoint: a directory named ``*.orbax``."""
    return Path(path).suffix == SUFFIX


def _orbax() -> Any:
    try:
        import orbax.checkpoint as ocp  # optional: pip install mnet[orbax]
    except ImportError:
        raise CheckpointError(
            "a checkpoint path ending in .orbax is a sharded checkpoint, which needs orbax-checkpoint: "
            "pip install 'mnet[orbax]' (or use a single-file path such as run.safetensors)"
        ) from None
    return ocp


def _manager(path: Path, ocp: Any) -> Any:
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    return ocp.CheckpointManager(path.absolute(), options=options, item_names=("state", "metadata"))


def _leaves(tree: Any) -> list[dict]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [
        {"path": jax.tree_util.keystr(p), "shape": list(np.shape(leaf)), "dtype": jnp.dtype(leaf.dtype).name}
        for p, leaf in flat
    ]


def save_sharded(path: str | Path, tree: Any, metadata: dict | None = None) -> None:
    """Write ``tree`` (arrays placed on any mesh, each process holding its shards) as the next step of the
    checkpoint directory ``path``; every process calls it. The previous step is deleted once this one is committed
    (the steps only count saves: a training checkpoint's epoch is in its metadata).

    Arguments:
        path: the checkpoint directory (``*.orbax``).
        tree: a pytree of arrays (jax arrays, sharded or not, or NumPy arrays).
        metadata: JSON-serialisable metadata, read back by :func:`read_sharded`.
    """
    ocp = _orbax()
    record = {"leaves": _leaves(tree), "metadata": metadata or {}}
    with _manager(Path(path), ocp) as manager:
        manager.save(
            (manager.latest_step() or 0) + 1,
            args=ocp.args.Composite(state=ocp.args.StandardSave(tree), metadata=ocp.args.JsonSave(record)),
            force=True,
        )
        manager.wait_until_finished()


def _latest(path: Path, manager: Any) -> int:
    step = manager.latest_step() if path.is_dir() else None
    if step is None:
        raise CheckpointError(f"{path}: no sharded checkpoint there (no committed step)")
    return step


def _record(manager: Any, step: int, ocp: Any) -> dict:
    """The step's JSON record (the leaves and the metadata), without reading its arrays."""
    return manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]


def read_sharded_metadata(path: str | Path) -> dict:
    """The metadata of the newest step of the checkpoint directory ``path``, without reading its arrays."""
    ocp, path = _orbax(), Path(path)
    with _manager(path, ocp) as manager:
        step = _latest(path, manager)
        record = _record(manager, step, ocp)
    return record["metadata"]


def read_sharded(path: str | Path, like: Any) -> tuple[Any, dict]:
    """The newest step's tree, whole, as host arrays of ``like``'s structure, and its metadata.

    Arguments:
        path: the checkpoint directory.
        like: a pytree of the expected structure, shapes and dtypes (arrays of any layout, or NumPy arrays).

    Returns:
        ``(tree, metadata)``.

    Raises:
        CheckpointError: no checkpoint, or one whose leaves differ from ``like`` (the first differing leaf named).
    """
    ocp, path = _orbax(), Path(path)
    with _manager(path, ocp) as manager:
        step = _latest(path, manager)
        record = _record(manager, step, ocp)
        _check(path, record["leaves"], _leaves(like))
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), like)
        state = ocp.args.PyTreeRestore(item=like, restore_args=restore_args)
        restored = manager.restore(step, args=ocp.args.Composite(state=state))["state"]
    leaves = [jnp.asarray(leaf) for leaf in jax.tree_util.tree_leaves(restored)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves), record["metadata"]


def read_sharded_entry(path: str | Path, index: int, like: Any) -> tuple[Any, dict]:
    """Entry ``index`` of the tuple in the newest step (a training checkpoint's parameters are entry 0), checked
    against ``like``, without knowing the other entries' structure: the arrays are read whole onto this process's
    default device, whatever layout wrote them.

    Returns:
        ``(entry, metadata)``. Raises :class:`CheckpointError` as :func:`read_sharded` does.
    """
    ocp, path = _orbax(), Path(path)
    with _manager(path, ocp) as manager:
        step = _latest(path, manager)
        record = _record(manager, step, ocp)
        prefix = f"[{index}]"
        chosen = [i for i, entry in enumerate(record["leaves"]) if entry["path"].startswith(prefix)]
        saved = [{**record["leaves"][i], "path": record["leaves"][i]["path"][len(prefix) :]} for i in chosen]
        _check(path, saved, _leaves(like))
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    leaves = jax.tree_util.tree_leaves(restored)
    entry = [jnp.asarray(leaves[i]) for i in chosen]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), entry), record["metadata"]


def _check(path: Path, saved: list[dict], expected: list[dict]) -> None:
    saved_paths, expected_paths = [e["path"] for e in saved], [e["path"] for e in expected]
    if saved_paths != expected_paths:
        missing = [p for p in expected_paths if p not in saved_paths][:5]
        extra = [p for p in saved_paths if p not in expected_paths][:5]
        raise CheckpointError(
            f"{path}: structure differs from the expected tree ({len(saved_paths)} leaves saved, "
            f"{len(expected_paths)} expected): missing {missing}, unexpected {extra}"
        )
    for got, want in zip(saved, expected):
        for key in ("shape", "dtype"):
            if got[key] != want[key]:
                raise CheckpointError(f"{path}: leaf {got['path']} has {key} {got[key]}, expected {want[key]}")
