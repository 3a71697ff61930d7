"""Paths into parameter trees (dicts and tuples): what :func:`mnet.core.walk.units` returns for every unit, read
and replaced by the checks and the parameter layouts."""

from __future__ import annotations

from typing import Any

import jax


def path_keys(path: tuple) -> tuple:
    """``jax.tree_util`` key entries (``DictKey``, ``SequenceKey``) as plain keys and indices."""
    return tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)


def at_path(tree: Any, path: tuple) -> Any:
    """The subtree of ``tree`` at ``path`` (plain keys and indices)."""
    for key in path:
        tree = tree[key]
    return tree


def replaced_at(tree: Any, path: tuple, value: Any) -> Any:
    """A copy of ``tree`` with the subtree at ``path`` replaced by ``value`` (the rest shared, not copied)."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(tree, dict):
        return {**tree, key: replaced_at(tree[key], rest, value)}
    items = list(tree)
    items[key] = replaced_at(items[key], rest, value)
    return tuple(items)


def flatten_with_keys(tree: Any, is_leaf: Any) -> list[tuple[tuple, Any]]:
    """``[(plain path, leaf)]`` of ``tree``, its leaves chosen by ``is_leaf``."""
    return [(path_keys(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]
