"""Saving and loading pytrees of arrays: atomically, without pickle, validated on the way back in.

The files are safetensors, which any safetensors reader (NumPy, PyTorch, Hugging Face's tools) opens: each leaf
one tensor named by its path (``0.W``), the tree's structure, checksums and mnet's version in the header's
metadata (:mod:`mnet.training.formats`); files in mnet's earlier ``.npz`` format still load. The readers also take
a sharded checkpoint, a directory named ``*.orbax`` (:mod:`mnet.training.sharded_checkpoint`).

Writes go to a temporary file in the target's directory, are flushed to disk, then renamed over the target,
so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnet.errors import CheckpointError
from mnet.training import formats, sharded_checkpoint

FORMAT = formats.FORMAT


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600 would make every checkpoint private to its writer
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError:
        pass


def save_tree(path: str | Path, tree: Any, metadata: dict | None = None) -> None:
    """Write any pytree of arrays (and JSON-serialisable ``metadata``) to ``path`` atomically, as safetensors
    (:mod:`mnet.training.formats`: each leaf a tensor named by its path, ``0.W``)."""
    data = formats.encode(tree, metadata)
    atomic_write(path, lambda file: file.write(data))


def read_metadata(path: str | Path) -> dict:
    """The ``metadata`` a file was saved with (a training checkpoint's epoch, configuration and history), without
    reading its arrays. Raises :class:`CheckpointError` as :func:`read_tree` does."""
    if sharded_checkpoint.is_sharded(path):
        return sharded_checkpoint.read_sharded_metadata(path)
    return formats.decode(Path(path), with_leaves=False)[0]["metadata"]


def _first_differing_part(saved: list[str], expected: list[str], parts: tuple[str, ...]) -> str:
    """Which of a tuple's named parts (``[0]``, ``[1]``, ...) holds the first difference between two leaf lists."""
    for index, name in enumerate(parts):
        prefix = f"[{index}]"
        if [p for p in saved if p.startswith(prefix)] != [p for p in expected if p.startswith(prefix)]:
            return name
    return "the structure"


def read_tree(path: str | Path, like: Any, parts: tuple[str, ...] = ()) -> tuple[Any, dict]:
    """Read a pytree saved by :func:`save_tree` and check it against ``like`` (same structure, shapes, dtypes).

    Arguments:
        path: the file.
        like: a pytree of the expected structure, shapes and dtypes.
        parts: when ``like`` is a tuple, a name for each of its entries (``"the optimizer state"``), so that a
            difference is reported as the part that differs rather than as a leaf path.

    Returns:
        ``(tree, metadata)`` with ``tree`` built on ``like``'s structure.

    Raises:
        CheckpointError: the file is missing, truncated, corrupted, not an mnet file, or differs from ``like``;
            the message names the path and what differs.
    """
    if sharded_checkpoint.is_sharded(path):
        return sharded_checkpoint.read_sharded(path, like)
    path = Path(path)
    manifest, raw = formats.decode(path, like)
    return _rebuilt(path, manifest["leaves"], raw, like, parts, prefix=""), manifest["metadata"]


def read_entry(path: str | Path, index: int, like: Any) -> tuple[Any, dict]:
    """Entry ``index`` of a tuple saved by :func:`save_tree` (the parameters of a training checkpoint are entry 0),
    checked against ``like``, without knowing the other entries' structure (the optimizer state, for one).

    Returns:
        ``(entry, metadata)``. Raises :class:`CheckpointError` as :func:`read_tree` does.
    """
    if sharded_checkpoint.is_sharded(path):
        return sharded_checkpoint.read_sharded_entry(path, index, like)
    path = Path(path)
    manifest, raw = formats.decode(path)
    prefix = f"[{index}]"
    chosen = [(entry, chunk) for entry, chunk in zip(manifest["leaves"], raw) if entry["path"].startswith(prefix)]
    entries, chunks = [entry for entry, _ in chosen], [chunk for _, chunk in chosen]
    return _rebuilt(path, entries, chunks, like, (), prefix), manifest["metadata"]


def _rebuilt(path: Path, saved: list, raw: list, like: Any, parts: tuple[str, ...], prefix: str) -> Any:
    """The tree of ``like``'s structure from the saved leaves (whose paths carry ``prefix``), every leaf checked."""
    expected, treedef = jax.tree_util.tree_flatten_with_path(like)
    saved_paths = [entry["path"][len(prefix) :] for entry in saved]
    expected_paths = [jax.tree_util.keystr(key_path) for key_path, _ in expected]
    if saved_paths != expected_paths and parts:
        raise CheckpointError(
            f"{path}: {_first_differing_part(saved_paths, expected_paths, parts)} in the file does not match this "
            "run's (saved by another network or optimizer, or with other settings)"
        )
    if saved_paths != expected_paths:
        missing = [p for p in expected_paths if p not in saved_paths]
        extra = [p for p in saved_paths if p not in expected_paths]
        detail = (
            "; ".join(
                part
                for part in (
                    f"missing {', '.join(missing[:5])}" if missing else "",
                    f"unexpected {', '.join(extra[:5])}" if extra else "",
                )
                if part
            )
            or "leaves in a different order"
        )
        raise CheckpointError(
            f"{path}: structure differs from the expected parameters ({len(saved_paths)} leaves saved, "
            f"{len(expected_paths)} expected): {detail}"
        )
    leaves = []
    for entry, (key_path, reference), chunk in zip(saved, expected, raw):
        where = jax.tree_util.keystr(key_path)
        shape, dtype = tuple(np.shape(reference)), jnp.dtype(getattr(reference, "dtype", np.asarray(reference).dtype))
        if tuple(entry["shape"]) != shape:
            raise CheckpointError(f"{path}: leaf {where} has shape {tuple(entry['shape'])}, expected {shape}")
        if jnp.dtype(entry["dtype"]) != dtype:
            raise CheckpointError(f"{path}: leaf {where} has dtype {entry['dtype']}, expected {dtype.name}")
        if chunk.size != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(
                f"{path}: leaf {where} holds {chunk.size} bytes, expected {int(np.prod(shape)) * dtype.itemsize}"
            )
        leaves.append(jnp.asarray(np.frombuffer(chunk.tobytes(), dtype).reshape(shape)))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def save_params(path: str | Path, params: Any) -> None:
    """Write a parameter pytree to ``path`` atomically (a crash never leaves a half-written file there).

    Arguments:
        path: destination file (conventionally ``*.safetensors``); parent directories are created.
        params: a pytree of arrays, e.g. from ``net.init``.
    """
    save_tree(path, params)


def load_params(path: str | Path, like: Any) -> Any:
    """Read parameters saved by :func:`save_params`, checked against ``like``. Never unpickles.

    Arguments:
        path: the file written by :func:`save_params`.
        like: a pytree of the same structure, shapes and dtypes (e.g. ``net.init(...)[1]``).

    Returns:
        The saved parameters, with ``like``'s structure.

    Raises:
        CheckpointError: missing, truncated, corrupted or mismatched file, naming the path and what differs.
    """
    return read_tree(path, like)[0]
