"""Datasets: the bundled handwritten digits by default, a generated sequence task, or user files (.npz,
MNIST-style IDX, CSV).

Every loader returns a :class:`Dataset` with float features (standardised with the training split's mean and
standard deviation) and integer labels ``0 .. K-1``; a ``.npz`` whose ``x`` holds integers keeps them as token
ids (for a network that starts with :class:`mnet.Embedding`), unstandardised. A file that is missing, malformed or inconsistent raises
:class:`mnet.errors.DataError` with one line naming the file and the problem.
"""

from __future__ import annotations

import csv
import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnet.errors import DataError

TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Dataset:
    """Train and test splits. ``x_*`` are arrays ``(n, *example_shape)``: float32 features (from the loaders), or
    integer token ids for a network that starts with an :class:`mnet.Embedding`; ``y_*`` int32 labels ``(n,)``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str
    #: The per-feature ``(mean, std)`` the loaders standardised with (from the training split; None for token ids or
    #: arrays given as they are), so that a trained model can standardise new inputs alike (``mnet predict``).
    standardisation: tuple[np.ndarray, np.ndarray] | None = None
    #: ``"classification"`` (integer labels; ``num_classes`` of them) or ``"regression"`` (float targets
    #: ``(n, num_classes)``: ``num_classes`` is then the number of outputs).
    task: str = "classification"
    #: Padding masks ``(n, T)`` (True at the tokens) for batches of sequences of several lengths, or None: :func:`mnet.fit`
    #: hands each batch's rows to the network (every attention layer) and the loss, so that padding counts for nothing.
    mask_train: np.ndarray | None = None
    mask_test: np.ndarray | None = None

    @property
    def example_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def __str__(self) -> str:
        outputs = f"{self.num_classes} classes" if self.task == "classification" else f"{self.num_classes} targets"
        return (
            f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} test examples of shape "
            f"{self.example_shape}, {outputs}"
        )


def split(x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float = TEST_FRACTION):
    """A seeded shuffled split into ``(x_train, y_train, x_test, y_test)``."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, int(round(len(x) * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def standardisation(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every feature's mean and standard deviation over the training split (1 for a constant feature)."""
    std = x_train.std(axis=0)
    return x_train.mean(axis=0), np.where(std > 1e-8, std, 1.0)


def standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre and scale every feature by the training split's statistics (constant features are only centred)."""
    mean, std = standardisation(x_train)
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim not in (1, 2):
        raise DataError(
            f"{where}: labels must have shape (examples,), or (examples, T) for one label per position, "
            f"got shape {y.shape}"
        )
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating) or y.dtype == bool):
        raise DataError(f"{where}: labels must be integers 0..K-1, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating) and not (np.all(np.isfinite(y)) and np.all(y == np.round(y))):
        bad = y[~(np.isfinite(y) & (y == np.round(y)))][0]
        raise DataError(f"{where}: labels must be integers 0..K-1, found {float(bad):g}")
    if y.size and y.min() < 0:
        raise DataError(f"{where}: labels must be integers 0..K-1, found {float(y.min()):g}")
    return y.astype(np.int32)


def _features(x: np.ndarray, where: str) -> np.ndarray:
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(f"{where}: features must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float64)
    if x.ndim < 2:
        raise DataError(f"{where}: features must have shape (examples, ...), got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{where}: features contain NaN or infinite values")
    return x


def prepared_inputs(
    x, example_shape: tuple[int, ...], dtype: str, scaling: tuple[np.ndarray, np.ndarray] | None, where: str
) -> np.ndarray:
    """New inputs for a trained network: ``(n, *example_shape)``, token ids kept as int32, features finite and
    standardised with the training data's ``scaling``. Raises :class:`DataError` naming ``where``."""
    x = np.asarray(x)
    if x.ndim == len(example_shape) and x.shape == tuple(example_shape):
        x = x[None]  # one example
    if x.shape[1:] != tuple(example_shape) or x.shape[0] == 0:
        raise DataError(
            f"{where}: the network takes examples of shape {tuple(example_shape)}, got an array of shape {x.shape}"
        )
    if dtype == "int32":
        if not np.issubdtype(x.dtype, np.integer):
            raise DataError(f"{where}: the network takes integer token ids, got dtype {x.dtype}")
        return x.astype(np.int32)
    x = _features(x, where)
    if scaling is not None:
        x = (x - scaling[0]) / scaling[1]
    return x.astype(np.float32)


def _values(y: np.ndarray, where: str) -> np.ndarray:
    """Regression targets: finite numbers, ``(n,)`` taken as one output ``(n, 1)``."""
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.number) or y.ndim not in (1, 2):
        raise DataError(f"{where}: regression targets must be numbers of shape (n,) or (n, k), got {y.dtype} {y.shape}")
    if not np.all(np.isfinite(y)):
        raise DataError(f"{where}: regression targets contain NaN or infinite values")
    return (y[:, None] if y.ndim == 1 else y).astype(np.float32)


def make_dataset(x, y, name: str, seed: int, x_test=None, y_test=None, regression: bool = False) -> Dataset:
    """Validate, split (when no test arrays are given) and standardise arrays into a :class:`Dataset`; integer
    features are token ids and stay as they are (int32). ``regression``: the targets are numbers, not labels."""
    token_ids = np.issubdtype(np.asarray(x).dtype, np.integer)
    targets = _values if regression else _labels
    x, y = _features(x, name), targets(y, name)
    if len(x) != len(y):
        raise DataError(f"{name}: {len(x)} examples but {len(y)} labels")
    if (x_test is None) != (y_test is None):
        raise DataError(f"{name}: give both x_test and y_test, or neither")
    if x_test is None:
        if len(x) < 2:
            raise DataError(f"{name}: need at least 2 examples to split into train and test, got {len(x)}")
        x, y, x_test, y_test = split(x, y, seed)
    else:
        x_test, y_test = _features(x_test, f"{name} (x_test)"), targets(y_test, f"{name} (y_test)")
        if len(x_test) != len(y_test):
            raise DataError(f"{name}: {len(x_test)} test examples but {len(y_test)} test labels")
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"{name}: test examples have shape {x_test.shape[1:]}, train examples {x.shape[1:]}")
    if len(x) == 0:
        raise DataError(f"{name}: no training examples")
    if regression and y_test.shape[1:] != y.shape[1:]:
        raise DataError(f"{name}: test targets have shape {y_test.shape[1:]}, training targets {y.shape[1:]}")
    num_classes = y.shape[1] if regression else int(max(y.max(), y_test.max() if len(y_test) else 0)) + 1
    if not regression and num_classes < 2:
        raise DataError(f"{name}: labels must cover at least 2 classes, found only {sorted(set(y.tolist()))}")
    scaling = None
    if token_ids:
        x, x_test = x.astype(np.int32), x_test.astype(np.int32)
    else:
        scaling = standardisation(x)
        x, x_test = standardise(x, x_test)
    y_test = y_test if regression else y_test.astype(np.int32)
    return Dataset(x, y, x_test, y_test, num_classes, name, scaling, "regression" if regression else "classification")


def load_digits(seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 examples, 10 classes), flattened to 64 features,
    with a seeded 80/20 split. Nothing is downloaded."""
    # Deferred: scikit-learn serves only the bundled digits and takes a second to import.
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return make_dataset(bunch.data, bunch.target, "digits", seed)


def _load_npz(path: Path, seed: int, regression: bool = False) -> Dataset:
    with path.open("rb") as handle:
        if handle.read(4) != b"PK\x03\x04":
            raise DataError(f"{path}: not a readable .npz archive (not a zip file)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except ValueError as error:  # object arrays need pickle, which is refused
        raise DataError(f"{path}: cannot read without unpickling ({error})") from None
    except Exception as error:
        raise DataError(f"{path}: not a readable .npz archive ({type(error).__name__}: {error})") from None
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise DataError(
            f"{path}: missing array(s) {', '.join(missing)}; expected x, y and optionally x_test, y_test "
            f"(found {', '.join(sorted(arrays)) or 'none'})"
        )
    return make_dataset(
        arrays["x"], arrays["y"], str(path), seed, arrays.get("x_test"), arrays.get("y_test"), regression
    )


_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (the MNIST format), plain or gzipped: magic ``00 00 type ndim``, big-endian int32 sizes,
    then the data in big-endian order."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read ({error})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}i", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX header promises {shape} ({expected} bytes) but {len(raw) - header} bytes follow")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def _idx_pair(images: Path) -> tuple[np.ndarray, np.ndarray]:
    name = images.name
    if "images-idx3" not in name:
        raise DataError(f"{images}: expected an MNIST-style images file named *-images-idx3-ubyte[.gz]")
    labels = images.with_name(name.replace("images-idx3", "labels-idx1"))
    if not labels.exists():
        raise DataError(f"{images}: its labels file {labels.name} is missing")
    x, y = read_idx(images), read_idx(labels)
    if len(x) != len(y):
        raise DataError(f"{images}: {len(x)} images but {labels.name} has {len(y)} labels")
    return x, y


def _load_idx(path: Path, seed: int) -> Dataset:
    """A directory holding ``train-images-idx3-ubyte[.gz]`` and its labels (and optionally ``t10k-*``), or
    one ``*-images-idx3-ubyte[.gz]`` file beside its labels file. Images become ``(n, rows * cols)`` floats."""
    if path.is_dir():
        found = {p.name.removesuffix(".gz"): p for p in path.iterdir()}
        train = found.get("train-images-idx3-ubyte")
        if train is None:
            raise DataError(f"{path}: no train-images-idx3-ubyte[.gz] in this directory")
        x, y = _idx_pair(train)
        test = found.get("t10k-images-idx3-ubyte")
        x_test, y_test = _idx_pair(test) if test else (None, None)
    else:
        x, y = _idx_pair(path)
        x_test = y_test = None
    flat = lambda a: None if a is None else a.reshape(len(a), -1)  # noqa: E731
    return make_dataset(flat(x), y, str(path), seed, flat(x_test), y_test)


def _load_csv(path: Path, seed: int, label_column: str | None, regression: bool = False) -> Dataset:
    """CSV with one example per row. The label column is ``label_column`` (a header name or a 0-based index),
    else a column headed ``label``/``y``/``target``/``class``, else the last column."""
    try:
        with path.open(newline="") as handle:
            rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read as CSV ({error})") from None
    if not rows:
        raise DataError(f"{path}: empty CSV file")

    def numeric(cell):
        try:
            float(cell)
            return True
        except ValueError:
            return False

    header = None if all(numeric(cell) for cell in rows[0]) else [cell.strip() for cell in rows[0]]
    body = rows[1:] if header else rows
    width = len(rows[0])
    if label_column is not None:
        if header and label_column in header:
            column = header.index(label_column)
        elif label_column.lstrip("-").isdigit() and -width <= int(label_column) < width:
            column = int(label_column) % width
        else:
            raise DataError(
                f"{path}: no label column {label_column!r} (columns: {', '.join(header or map(str, range(width)))})"
            )
    elif header and (named := [c for c in ("label", "y", "target", "class") if c in header]):
        column = header.index(named[0])
    else:
        column = width - 1
    values = np.empty((len(body), width))
    for line, row in enumerate(body, start=2 if header else 1):
        if len(row) != width:
            raise DataError(f"{path}: line {line} has {len(row)} fields, expected {width}")
        for index, cell in enumerate(row):
            try:
                values[line - (2 if header else 1), index] = float(cell)
            except ValueError:
                raise DataError(
                    f"{path}: line {line}, column {index + 1}: non-numeric value {cell.strip()!r}"
                ) from None
    if width < 2:
        raise DataError(f"{path}: need at least one feature column besides the label")
    return make_dataset(np.delete(values, column, axis=1), values[:, column], str(path), seed, regression=regression)


def odd_one_out(count: int, vocab: int, pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The "odd one out" sequence task: ``count`` sequences of length ``2 * pairs + 1`` holding ``pairs`` distinct
    tokens twice each and one more token once, shuffled; the label is the token that appears once. Each position
    must compare itself with every other, which is what attention does; a model that sees tokens one at a time
    cannot beat guessing among the tokens present (about 1 in ``pairs + 1``)."""
    tokens = np.argsort(rng.random((count, vocab)), axis=1)[:, : pairs + 1]  # distinct tokens per sequence
    sequences = np.concatenate([tokens[:, :pairs], tokens], axis=1)
    order = np.argsort(rng.random(sequences.shape), axis=1)
    return np.take_along_axis(sequences, order, axis=1).astype(np.int32), tokens[:, pairs].astype(np.int32)


def load_odd_one_out(seed: int = 0, train: int = 30000, test: int = 2000, vocab: int = 16, pairs: int = 4) -> Dataset:
    """:func:`odd_one_out` as a :class:`Dataset` of token ids (``vocab`` tokens and classes), generated from
    ``seed``: the sequence task of the transformer experiment and of ``mnet train --model transformer``."""
    rng = np.random.default_rng(seed)
    x_train, y_train = odd_one_out(train, vocab, pairs, rng)
    x_test, y_test = odd_one_out(test, vocab, pairs, rng)
    return Dataset(x_train, y_train, x_test, y_test, vocab, "odd one out")


def load(
    path: str | Path | None = None, seed: int = 0, label_column: str | None = None, regression: bool = False
) -> Dataset:
    """Load a dataset: the bundled digits when ``path`` is None, else a ``.npz`` (arrays ``x``, ``y``, optionally
    ``x_test``, ``y_test``), an IDX file or directory (MNIST, Fashion-MNIST), or a ``.csv``.

    Arguments:
        path: the file or directory, or None for the digits bundled with scikit-learn.
        seed: seeds the train/test split when the data has no test part.
        label_column: for CSV, the label column's header name or 0-based index.
        regression: the targets are numbers (``.npz`` and ``.csv``), not class labels.

    Returns:
        A standardised :class:`Dataset`.

    Raises:
        DataError: one line naming the file and the problem.
    """
    if path is None:
        if regression:
            raise DataError("regression needs a data file with numeric targets (.npz or .csv); the digits are labels")
        return load_digits(seed)
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    name = path.name.lower()
    if name.endswith(".npz"):
        return _load_npz(path, seed, regression)
    if name.endswith(".csv"):
        return _load_csv(path, seed, label_column, regression)
    if regression:
        raise DataError(f"{path}: regression reads numeric targets from .npz or .csv files")
    if path.is_dir() or "idx" in name:
        return _load_idx(path, seed)
    raise DataError(f"{path}: unknown format; expected .npz, .csv, or MNIST-style IDX files (*-idx3-ubyte[.gz])")
