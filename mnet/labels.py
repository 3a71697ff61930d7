"""Class labels: which are in range, and the refusal of concrete labels that are not (naming the first one)."""

from __future__ import annotations

import jax
import numpy as np

from mnet.errors import LossError

Array = jax.Array


def in_range(labels: Array, classes: int, ignore_index: int | None = None) -> Array:
    """Whether each label is a class in ``[0, classes)`` or ``ignore_index`` (traceable: for the labels under jit)."""
    inside = (labels >= 0) & (labels < classes)
    return inside if ignore_index is None else inside | (labels == ignore_index)


def check_labels(labels: Array, classes: int, where: str, ignore_index: int | None = None) -> None:
    """Refuse concrete class labels outside ``[0, classes)`` (``ignore_index`` allowed) with a :class:`LossError`
    naming the first one."""
    concrete = np.asarray(labels).reshape(-1)
    ignored = concrete == ignore_index if ignore_index is not None else np.zeros(concrete.shape, bool)
    outside = np.flatnonzero(((concrete < 0) | (concrete >= classes)) & ~ignored)
    if outside.size:
        index = int(outside[0])
        raise LossError(
            f"{where}: label {int(concrete[index])} (at index {index}) is outside [0, {classes}) for {classes} classes"
        )
