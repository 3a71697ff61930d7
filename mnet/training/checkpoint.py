"""Saving and loading pytrees of arrays: atomically, without pickle, validated on the way back in.

File format (a NumPy ``.npz`` zip, read with ``allow_pickle=False``):

* ``manifest``: UTF-8 JSON with the format tag, one entry per leaf (its path such as ``[0]['W']``, shape and
  dtype), a SHA-256 of all leaf bytes, free-form ``metadata`` (a training checkpoint keeps its epoch,
  seed, configuration, history and the network's description there) and a SHA-256 of the metadata;
* ``leaf_0``, ``leaf_1``, ...: each leaf's raw bytes as ``uint8``, so every dtype (bfloat16 included)
  round-trips exactly.

Writes go to a temporary file in the target's directory, are flushed to disk, then renamed over the target,
so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnet.errors import CheckpointError

FORMAT = "mnet-pytree-v1"


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def _leaf_bytes(leaf, where: str) -> tuple[np.ndarray, dict]:
    array = np.asarray(leaf)
    if not (jnp.issubdtype(array.dtype, jnp.number) or array.dtype == bool):
        # an object array's bytes are pointers: written, they would read back as garbage
        raise CheckpointError(
            f"cannot save leaf {where}: {type(leaf).__name__} of dtype {array.dtype} is no array of numbers"
        )
    raw = np.frombuffer(array.tobytes(order="C"), np.uint8)
    return raw, {"shape": list(array.shape), "dtype": jnp.dtype(array.dtype).name}


def save_tree(path: str | Path, tree: Any, metadata: dict | None = None) -> None:
    """Write any pytree of arrays (and JSON-serialisable ``metadata``) to ``path`` atomically."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    arrays, entries, digest = {}, [], hashlib.sha256()
    for index, (key_path, leaf) in enumerate(flat):
        raw, entry = _leaf_bytes(leaf, jax.tree_util.keystr(key_path))
        arrays[f"leaf_{index}"] = raw
        entries.append({"path": jax.tree_util.keystr(key_path), **entry})
        digest.update(raw.tobytes())
    metadata = metadata or {}
    manifest = {
        "format": FORMAT,
        "leaves": entries,
        "sha256": digest.hexdigest(),
        "metadata": metadata,
        "metadata_sha256": _metadata_digest(metadata),
    }
    arrays["manifest"] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
    atomic_write(path, lambda file: np.savez(file, **arrays))  # type: ignore[arg-type]  # numpy stubs type **arrays as allow_pickle


def _metadata_digest(metadata: Any) -> str:
    """A SHA-256 of the metadata's canonical JSON: an edit to the architecture or the configuration after the file
    was written is refused on reading, as an edit to the arrays is."""
    return hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()


def _read_archive(path: Path, with_leaves: bool = True) -> tuple[dict, list]:
    """The manifest and (optionally) the raw leaves of an mnet file, checked for format and checksum."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "manifest" not in archive.files:
                raise CheckpointError(f"{path}: not an mnet checkpoint (no manifest)")
            manifest = json.loads(archive["manifest"].tobytes().decode())
            leaves = manifest["leaves"] if with_leaves else []
            raw = [archive[f"leaf_{i}"] for i in range(len(leaves))]
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, KeyError, OSError, ValueError, json.JSONDecodeError, TypeError) as error:
        # numpy's own message would suggest allow_pickle=True for a file that is no archive: never advice to give.
        raise CheckpointError(
            f"{path}: truncated or corrupted checkpoint, or another kind of file ({type(error).__name__})"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{path}: unknown checkpoint format {found!r}, expected {FORMAT!r}")
    # Files written before the metadata had a checksum carry none, and still load.
    if "metadata_sha256" in manifest and manifest["metadata_sha256"] != _metadata_digest(manifest.get("metadata")):
        raise CheckpointError(f"{path}: its metadata (configuration, architecture) was edited after it was written")
    if with_leaves:
        digest = hashlib.sha256()
        for chunk in raw:
            digest.update(chunk.tobytes())
        if digest.hexdigest() != manifest["sha256"]:
            raise CheckpointError(f"{path}: corrupted checkpoint (checksum mismatch)")
    return manifest, raw


def read_metadata(path: str | Path) -> dict:
    """The ``metadata`` a file was saved with (a training checkpoint's epoch, configuration and history), without
    reading its arrays. Raises :class:`CheckpointError` as :func:`read_tree` does."""
    return _read_archive(Path(path), with_leaves=False)[0]["metadata"]


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
    path = Path(path)
    manifest, raw = _read_archive(path)

    return _rebuilt(path, manifest["leaves"], raw, like, parts, prefix=""), manifest["metadata"]


def read_entry(path: str | Path, index: int, like: Any) -> tuple[Any, dict]:
    """Entry ``index`` of a tuple saved by :func:`save_tree` (the parameters of a training checkpoint are entry 0),
    checked against ``like``, without knowing the other entries' structure (the optimizer state, for one).

    Returns:
        ``(entry, metadata)``. Raises :class:`CheckpointError` as :func:`read_tree` does.
    """
    path = Path(path)
    manifest, raw = _read_archive(path)
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
        path: destination file (conventionally ``*.npz``); parent directories are created.
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
