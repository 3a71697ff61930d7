"""The Laplace approximation's per-layer structure: a ``KronBlock`` (eigenbases and eigenvalues) or a diagonal per
entry, walked beside the params-like trees by one helper; the settings' checks."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax

from mnet.errors import SettingError
from mnet.quantities.kronecker import KronBlock, is_factor_pair

Array = jax.Array

STRUCTURES = ("diag", "kron")

LINKS = ("probit", "sampled", "map")


def is_entry(node: Any) -> bool:
    return is_factor_pair(node) or node is None or isinstance(node, KronBlock)


def map_entries(fn: Callable[..., Any], structure: Any, *trees: Any) -> Any:
    """``fn(entry, *subtrees)`` at every layer entry of ``structure`` (a factor pair, a :class:`KronBlock`, None for a
    layer without Kronecker structure, or a parameterless layer's ``()``), with the matching subtrees of ``trees``
    (like params)."""
    if is_entry(structure) or structure == ():
        return fn(structure, *trees)
    if isinstance(structure, dict):
        return {name: map_entries(fn, structure[name], *(tree[name] for tree in trees)) for name in structure}
    return type(trees[0])(map_entries(fn, *children) for children in zip(structure, *trees))


def positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise SettingError(f"laplace: {name} must be a positive number, got {value!r}")
    return float(value)


def chunk_of(mask: Array | None, part: slice) -> Array | None:
    """A padding mask's rows for one chunk (None stays None)."""
    return None if mask is None else mask[part]
