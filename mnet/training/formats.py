"""The bytes of a checkpoint file: safetensors, which any safetensors reader opens, and the earlier ``.npz`` format,
still read.

**safetensors** (written since mnet 0.1; Hugging Face's format: an 8-byte header length, a JSON header, the raw
little-endian arrays; no code is ever run on reading). Each leaf of the pytree is one tensor named by its path with
``.`` between the keys: the parameters ``[{"W", "b"}, (), {"W", "b"}]`` of ``serial(Dense, Relu, Dense)`` are
``0.W``, ``0.b``, ``2.W``, ``2.b``, and entry 0 of a training checkpoint (the parameters, then the optimizer state)
prefixes them with ``0.``. The header's ``__metadata__`` holds three strings:

* ``format``: ``mnet-safetensors-v1``;
* ``mnet_version``: the version that wrote the file;
* ``manifest``: JSON with the leaves in the tree's order (each leaf's name and its JAX path, such as ``[0]['W']``), a
  SHA-256 of all leaf bytes in that order (safetensors itself has no checksum), free-form ``metadata`` (a training
  checkpoint keeps its epoch, seed, configuration, history and the network's description there) and a SHA-256 of
  the metadata.

So ``safetensors.numpy.load_file(path)`` (or ``safetensors.torch.load_file``) gives ``{"0.W": ..., "0.b": ...}``.
A safetensors file written by another tool, without mnet's manifest, is read by those names against the expected
tree.

**npz** (``mnet-pytree-v1``, read only): a NumPy zip read with ``allow_pickle=False``, holding a ``manifest`` (the
JSON above with each leaf's shape and dtype) and ``leaf_0``, ``leaf_1``, ... as raw ``uint8`` bytes.

Both readers return the same thing: the manifest (format, leaves with path, shape and dtype, checksums, metadata)
and each leaf's raw bytes, which :mod:`mnet.training.checkpoint` checks against the tree it expects.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from mnet.errors import CheckpointError

FORMAT = "mnet-safetensors-v1"
NPZ_FORMAT = "mnet-pytree-v1"

# safetensors' dtype codes and the NumPy (ml_dtypes) names of the same dtypes.
DTYPE_OF_CODE = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "C64": "complex64",
}
_CORRUPT = "truncated or corrupted checkpoint, or another kind of file"


def tensor_name(key_path: Any) -> str:
    """The safetensors name of the leaf at ``key_path``: its keys joined by ``.`` (``[1]['q']['W']`` is ``1.q.W``)."""
    return jax.tree_util.keystr(key_path, simple=True, separator=".")


def tensor_names(flat: list) -> list[str]:
    """The names of the flattened leaves ``[(key_path, leaf), ...]`` in their order, refused when two leaves would
    share one (a dict key holding a ``.``, say, can make ``{"a.b": x}`` and ``{"a": {"b": y}}`` collide)."""
    names = [tensor_name(key_path) for key_path, _ in flat]
    if len(set(names)) != len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        raise CheckpointError(f"cannot save: two leaves would share the tensor name {repeated[0]!r}")
    return names


def leaf_array(leaf: Any, where: str) -> np.ndarray:
    """A leaf as a contiguous NumPy array of numbers, refused by name otherwise."""
    array = np.asarray(leaf)
    array = array if array.flags.c_contiguous else array.copy(order="C")  # ascontiguousarray would make () (1,)
    if not (jnp.issubdtype(array.dtype, jnp.number) or array.dtype == bool):
        # an object array's bytes are pointers: written, they would read back as garbage
        raise CheckpointError(
            f"cannot save leaf {where}: {type(leaf).__name__} of dtype {array.dtype} is no array of numbers"
        )
    if array.dtype.name not in DTYPE_OF_CODE.values():
        raise CheckpointError(f"cannot save leaf {where}: safetensors has no dtype {array.dtype.name}")
    return array


def metadata_digest(metadata: Any) -> str:
    """A SHA-256 of the metadata's canonical JSON: an edit to the architecture or the configuration after the file
    was written is refused on reading, as an edit to the arrays is."""
    return hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()


def mnet_version() -> str:
    try:
        return package_metadata.version("mnet")
    except package_metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def encode(tree: Any, metadata: dict | None = None) -> bytes:
    """The safetensors bytes of ``tree`` (any pytree of arrays) and its JSON-serialisable ``metadata``."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = tensor_names(flat)
    arrays = [leaf_array(leaf, jax.tree_util.keystr(key_path)) for key_path, leaf in flat]
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(array.tobytes())
    metadata = metadata or {}
    manifest = {
        "leaves": [{"name": name, "path": jax.tree_util.keystr(key_path)} for name, (key_path, _) in zip(names, flat)],
        "sha256": digest.hexdigest(),
        "metadata": metadata,
        "metadata_sha256": metadata_digest(metadata),
    }
    header = {"format": FORMAT, "mnet_version": mnet_version(), "manifest": json.dumps(manifest)}
    return safetensors.numpy.save(dict(zip(names, arrays)), metadata=header)


def decode(path: Path, like: Any = None, with_leaves: bool = True) -> tuple[dict, list[np.ndarray]]:
    """The manifest and (optionally) the raw leaves of a checkpoint file in either format, checked for format and
    checksums. A safetensors file without mnet's manifest is matched to ``like``'s tensor names."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(
            f"{path}: a directory, not a checkpoint file (a sharded checkpoint's name ends in .orbax)"
        )
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic == b"PK\x03\x04":
        manifest, raw = _read_npz(path, with_leaves)
    else:
        manifest, raw = _read_safetensors(path, like, with_leaves)
    _check(path, manifest, raw, with_leaves)
    return manifest, raw


def _read_safetensors(path: Path, like: Any, with_leaves: bool) -> tuple[dict, list[np.ndarray]]:
    try:
        with safetensors.safe_open(path, framework="np") as file:
            header = file.metadata() or {}
        stored = json.loads(header["manifest"]) if "manifest" in header else None
        wanted = with_leaves or stored is None
        tensors = dict(safetensors.deserialize(path.read_bytes())) if wanted else {}
    except (safetensors.SafetensorError, OSError, ValueError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: {_CORRUPT} ({type(error).__name__})") from None
    if stored is None:  # another tool's file: its tensor names are the documented paths
        stored = _foreign_manifest(path, tensors, like)
    elif header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {header.get('format')!r}, expected {FORMAT!r}")
    else:
        stored["format"] = FORMAT
    if not with_leaves:
        return stored, []
    leaves, raw = [], []
    for entry in stored["leaves"]:
        view = tensors.get(entry["name"])
        if view is None or view["dtype"] not in DTYPE_OF_CODE:
            raise CheckpointError(f"{path}: {_CORRUPT} (tensor {entry['name']!r} missing or of an unknown dtype)")
        leaves.append({**entry, "shape": list(view["shape"]), "dtype": DTYPE_OF_CODE[view["dtype"]]})
        raw.append(np.frombuffer(view["data"], np.uint8))
    return {**stored, "leaves": leaves}, raw


def _foreign_manifest(path: Path, tensors: dict, like: Any) -> dict:
    """The manifest of a safetensors file that mnet did not write: ``like``'s leaves in order by name, then the names
    it does not have (which the check against ``like`` reports as unexpected)."""
    if like is None:
        raise CheckpointError(f"{path}: a safetensors file without mnet's manifest (not written by mnet)")
    flat = jax.tree_util.tree_flatten_with_path(like)[0]
    path_of = {tensor_name(key_path): jax.tree_util.keystr(key_path) for key_path, _ in flat}
    known = [name for name in path_of if name in tensors]
    unknown = sorted(name for name in tensors if name not in path_of)
    leaves = [{"name": name, "path": path_of.get(name, name)} for name in known + unknown]
    return {"format": FORMAT, "leaves": leaves, "metadata": {}}


def _read_npz(path: Path, with_leaves: bool) -> tuple[dict, list[np.ndarray]]:
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
        raise CheckpointError(f"{path}: {_CORRUPT} ({type(error).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != NPZ_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{path}: unknown checkpoint format {found!r}, expected {NPZ_FORMAT!r}")
    return manifest, raw


def _check(path: Path, manifest: dict, raw: list[np.ndarray], with_leaves: bool) -> None:
    # Files written before the metadata had a checksum carry none, and still load.
    if "metadata_sha256" in manifest and manifest["metadata_sha256"] != metadata_digest(manifest.get("metadata")):
        raise CheckpointError(f"{path}: its metadata (configuration, architecture) was edited after it was written")
    if with_leaves and "sha256" in manifest:
        digest = hashlib.sha256()
        for chunk in raw:
            digest.update(chunk.tobytes())
        if digest.hexdigest() != manifest["sha256"]:
            raise CheckpointError(f"{path}: corrupted checkpoint (checksum mismatch)")
