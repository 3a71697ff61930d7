"""``mnet bench --peers``: every quantity of the curvature rows beside JAX's autodiff and the PyTorch tools a user
would otherwise pick (BackPACK, curvlinops, Opacus, torch.func), in one process, on identical weights.

Each row is one problem (rows P1 to P3); its contenders are named ``quantity · framework``. Before anything is
timed, every contender's result is compared with mnet's own number for the quantity (the relative error over all
its leaves, ``||peer - mnet|| / ||mnet||``: the row's ``agreement``); a sampled quantity (one Monte-Carlo label per
example) cannot agree draw for draw across frameworks, so its check runs every framework with
:data:`CHECK_SAMPLES` draws instead and compares with the exact quantity. Times are then interleaved as in every
row (:mod:`mnet.bench.timing`) and reported against mnet's gradient and against each framework's own gradient step
(``per_own_gradient``): mnet's and JAX autodiff's against their gradient in JAX, the peers' against PyTorch's
autograd on the same model. Like :mod:`mnet.bench`, this module calls JAX's autodiff: it is a contender.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from mnet.bench import peers
from mnet.bench.peer_quantities import (
    CHECK_SAMPLES,
    EXACT_OF,
    OWN_GRADIENT,
    Quantities,
    cnn_quantities,
    gradient_contenders,
    installed,
    mlp_quantities,
    tanh_quantities,
)
from mnet.bench.peers import TorchProblem
from mnet.bench.timing import Row, interleaved_medians


def relative_error(candidate: Any, reference: Any) -> float:
    """The largest ``||candidate - reference|| / ||reference||`` over the leaves of two trees of the same structure
    (per leaf, so that a small leaf's error is not lost beside a large one: a ``G`` beside its ``A``)."""
    pairs = list(zip(jax.tree_util.tree_leaves(candidate), jax.tree_util.tree_leaves(reference)))
    if len(pairs) != len(jax.tree_util.tree_leaves(reference)) or not pairs:
        raise ValueError("relative_error: the trees hold different numbers of leaves")
    errors = []
    for c, r in pairs:
        c, r = np.asarray(c, np.float64), np.asarray(r, np.float64)
        if c.shape != r.shape:
            raise ValueError(f"relative_error: a leaf of shape {c.shape} against {r.shape}")
        errors.append(np.linalg.norm(c - r) / max(np.linalg.norm(r), np.finfo(np.float64).tiny))
    return float(max(errors))


def peer_row(name: str, description: str, problem: TorchProblem, quantities: dict, available: dict, rounds: int) -> Row:
    """Check every contender against mnet's number, then time them all interleaved (module text)."""
    with quiet_hooks():
        return _checked_and_timed(name, description, problem, quantities, available, rounds)


@contextlib.contextmanager
def quiet_hooks() -> Iterator[None]:
    """Leave out PyTorch's notes on the peers' own code, true and nothing for a user of mnet to act on: that a full
    backward hook fires although the batch needs no gradient (BackPACK's and Opacus' hooks, at every call), and that
    ``torch.jit.script`` is deprecated (curvlinops' ``linear_operator`` scripts functions when first used)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
        yield


def _checked_and_timed(
    name: str, description: str, problem: TorchProblem, quantities: dict, available: dict, rounds: int
) -> Row:
    contenders, agreement = checked(problem, quantities, available)
    seconds = interleaved_medians({c: entry[1].call for c, entry in contenders.items()}, rounds)
    own = {
        c: seconds[c] / seconds[OWN_GRADIENT[framework]]
        for c, (framework, _) in contenders.items()
        if OWN_GRADIENT[framework] in seconds
    }
    return Row(
        name,
        description,
        seconds,
        OWN_GRADIENT["mnet"],
        {
            "agreement": agreement,
            "per_own_gradient": own,
            "frameworks": {c: framework for c, (framework, _) in contenders.items()},
            "peers": available,
            "check_samples": CHECK_SAMPLES,
        },
    )


def checked(problem: TorchProblem, quantities: dict, available: dict) -> tuple[dict, dict[str, float]]:
    """Every contender of a row (each framework's gradient first), by its name ``quantity · framework``, with its
    agreement: the relative error against mnet's number (:func:`relative_error`), against the exact quantity for a
    sampled one (:data:`EXACT_OF`)."""
    with quiet_hooks():
        return _checked(problem, quantities, available)


def named_contenders(problem: TorchProblem, quantities: Quantities, available: dict) -> dict:
    """Every contender of a row by its name ``quantity · framework``, each framework's gradient first."""
    contenders = gradient_contenders(problem, available)
    for quantity, found in quantities.items():
        for contender, entry in found.items():
            contenders[f"{quantity} · {contender}"] = entry
    return contenders


def _checked(problem: TorchProblem, quantities: Quantities, available: dict) -> tuple[dict, dict[str, float]]:
    contenders = named_contenders(problem, quantities, available)
    references: dict[str, Any] = {}  # mnet's exact number per quantity, computed once (a sampled one shares it)
    agreement = {}
    for quantity in ["gradient", *quantities]:
        exact = EXACT_OF.get(quantity, quantity)
        if exact not in references:
            mnet = contenders[f"{exact} · mnet"][1]
            references[exact] = mnet.convert(mnet.call())
        for c in (c for c in contenders if c.startswith(f"{quantity} · ")):
            agreement[c] = relative_error(contenders[c][1].value(), references[exact])
    return contenders, agreement


def plans(quick: bool, rounds: int) -> dict[str, Callable[[], Row]]:
    """The peer rows for :func:`mnet.bench.suite.run` (``--peers``): the MLP of the issue's table, a tanh MLP for
    the Hessian diagonal, and a CNN on 28x28 images; ``quick`` shrinks them to a smoke test of every contender."""
    available = peers.availability()
    widths = [784, 64, 10] if quick else [784, 512, 512, 10]
    shape = "-".join(map(str, widths))
    mlp_batch, tanh_batch, cnn_batch = (16, 8, 4) if quick else (128, 32, 64)

    def mlp_row() -> Row:
        problem = peers.mlp_problem(widths, mlp_batch)
        description = f"mnet, JAX autodiff and the PyTorch peers, MLP {shape} (ReLU), batch {mlp_batch}"
        return peer_row("P1", description, problem, mlp_quantities(problem, available), available, rounds)

    def tanh_row() -> Row:
        problem = peers.mlp_problem(widths, tanh_batch, "tanh")
        description = f"the exact Hessian diagonal beside BackPACK's, MLP {shape} (tanh), batch {tanh_batch}"
        return peer_row("P2", description, problem, tanh_quantities(problem, available), available, rounds)

    def cnn_row() -> Row:
        if not installed(available, "torch"):
            return Row(
                "P3", f"CNN row {available['torch']}: it builds its CNN in PyTorch", {}, "", {"peers": available}
            )
        problem = peers.cnn_problem(cnn_batch, (4, 8) if quick else (16, 32))
        description = f"CNN 28x28 (two 3x3 convolutions, max pooling, a linear layer), batch {cnn_batch}"
        return peer_row("P3", description, problem, cnn_quantities(problem, available), available, rounds)

    rows = {"P1": mlp_row, "P2": tanh_row}
    if installed(available, "torch"):  # the CNN is built in PyTorch; without it P1 lists torch's reason
        rows["P3"] = cnn_row
    return rows


def markdown_table(row: dict) -> str:
    """A peer row of :func:`mnet.bench.suite.run`'s result as the docs' table: a line per quantity, mnet's time,
    JAX autodiff's and each peer's, each with its multiple of its own framework's gradient step (``g``)."""
    frameworks, seconds, own = row["extra"]["frameworks"], row["seconds"], row["extra"]["per_own_gradient"]
    columns: dict[str, dict[str, list[str]]] = {}
    for name, framework in frameworks.items():
        quantity, contender = name.split(" · ", 1)
        cell = f"{seconds[name] * 1e3:,.1f} ms ({own[name]:.2f} g)"
        cell = cell if contender == "mnet" else f"{contender} {cell}"
        columns.setdefault(quantity, {"mnet": [], "jax": [], "torch": []})[framework].append(cell)
    lines = ["| quantity | mnet | autodiff in JAX | PyTorch peers |", "| --- | --- | --- | --- |"]
    for quantity, cells in columns.items():
        lines.append(
            f"| {quantity} | " + " | ".join("; ".join(cells[f]) or "-" for f in ("mnet", "jax", "torch")) + " |"
        )
    return "\n".join(lines)
