"""Text every Python installation ships, as character-level language-model data: the standard library's own source.

The ``*.py`` files at the top of the running interpreter's standard library (``sysconfig``'s ``stdlib`` path), sorted
by name; every tenth file is held out for validation, so that no file is split between the two. Characters:
printable ASCII and newline (tabs become spaces, anything else one "unknown" symbol): :data:`VOCAB` = 97 symbols.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np

from mnet.errors import DataError
from mnet.training.data import Dataset

UNKNOWN, NEWLINE, FIRST_PRINTABLE = 0, 96, 32
VOCAB = 97


def encode(text: str) -> np.ndarray:
    """Printable ASCII ``' '..'~'`` to 1..95, newline to 96, tab to a space, anything else to 0."""
    codes = np.frombuffer(text.replace("\t", " ").encode("utf-32-le"), np.uint32).astype(np.int64)
    ids = np.where((codes >= FIRST_PRINTABLE) & (codes < 127), codes - FIRST_PRINTABLE + 1, UNKNOWN)
    return np.where(codes == 10, NEWLINE, ids).astype(np.int32)


def decode(ids) -> str:
    """The inverse of :func:`encode` (the unknown symbol as ``?``)."""
    return "".join("\n" if i == NEWLINE else "?" if i == UNKNOWN else chr(int(i) + FIRST_PRINTABLE - 1) for i in ids)


def stdlib_corpus(max_chars: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """``(train ids, validation ids, number of files)`` from the standard library's top-level sources, every tenth
    file (by name) held out; each part cut to ``max_chars`` when given.

    Raises:
        DataError: when the interpreter ships (almost) no standard library source.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if len(files) < 20:
        raise DataError(f"found only {len(files)} source files in {root}; this interpreter ships no stdlib to train on")
    parts: tuple[list[str], list[str]] = ([], [])
    for index, path in enumerate(files):
        parts[index % 10 == 0].append(path.read_text(encoding="utf-8", errors="replace"))
    train, valid = ("\n".join(texts) for texts in parts)
    if max_chars is not None:
        train, valid = train[:max_chars], valid[:max_chars]
    return encode(train), encode(valid), len(files)


def windows(ids: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows of ``context`` characters and their next characters: ``(x, y)``, each
    ``(n, context)``, ``y`` the ``x`` shifted by one."""
    n = (len(ids) - 1) // context
    x = ids[: n * context].reshape(n, context)
    y = ids[1 : n * context + 1].reshape(n, context)
    return x, y


def load_stdlib_text(context: int = 128, max_chars: int | None = 400_000) -> Dataset:
    """The corpus as a :class:`Dataset` of next-character prediction: windows of ``context`` ids and, as labels,
    the ids shifted by one (``(n, context)`` each); 97 classes. The loss over it, in nats per character, is
    ``bits_per_character * log(2)``."""
    train, valid, _ = stdlib_corpus(max_chars)
    x_train, y_train = windows(train, context)
    x_test, y_test = windows(valid, context)
    return Dataset(x_train, y_train, x_test, y_test, VOCAB, "stdlib characters")


def bits_per_character(nats: float) -> float:
    """A mean cross-entropy in nats per character, in bits."""
    return nats / math.log(2)
