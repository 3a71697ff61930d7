"""What XLA says about a compiled program (its memory and cost analyses) and how long it takes (the median of
timed calls), shared by the checks, the benchmarks and training.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


#: The memory analysis of a program that has none (a Python loop of programs, a backend without the analysis).
NOT_AVAILABLE: dict[str, int | str] = {"temp_bytes": "n/a", "peak_bytes": "n/a", "argument_bytes": "n/a"}


def compiled_memory(compiled: Any) -> dict[str, int | str]:
    """XLA's memory analysis of a compiled program: ``temp_bytes`` (its scratch buffers: the activations and
    intermediates it keeps), ``argument_bytes`` (its inputs; per device for a program partitioned over several) and
    ``peak_bytes`` (the estimate temporary + arguments + outputs - aliased). A backend without the analysis, or one
    that reports only zeros, gives ``"n/a"`` for each, never a zero."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        stats = None
    sizes = (
        [getattr(stats, f"{name}_size_in_bytes", 0) or 0 for name in ("temp", "argument", "output", "alias")]
        if stats is not None
        else [0, 0, 0, 0]
    )
    if not any(sizes):
        return dict(NOT_AVAILABLE)
    temp, arguments, outputs, aliased = (int(size) for size in sizes)
    return {"temp_bytes": temp, "peak_bytes": temp + arguments + outputs - aliased, "argument_bytes": arguments}


def cost_analysis(compiled: Any) -> dict:
    """XLA's cost analysis of a compiled program as one dict (``flops``, ``bytes accessed``, ...): some versions
    return a list of one; empty where the backend has none."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return {}
    cost = cost[0] if isinstance(cost, list | tuple) and cost else cost
    return cost if isinstance(cost, dict) else {}


#: A solver XLA's cost analysis counts as nothing: a LAPACK or cuSOLVER custom call, a triangular solve, a Cholesky.
SOLVER = re.compile(r"\b(triangular-solve|cholesky)\(|custom_call_target=\"(?![^\"]*(gemm|matmul))")
#: Where the analysis counts a computation other than once: a loop's body (once, whatever its trip count) and a
#: conditional's branches (all of them, summed).
REPEATED = re.compile(r"\b(?:body|branch_computations)=\{?([^,}]+(?:, *%[^,}]+)*)\}?")


def _miscounted(text: str) -> bool:
    """Whether ``text`` (a compiled program's HLO) holds arithmetic the cost analysis counts wrong: a solver anywhere,
    or a product (``dot``, ``convolution``) in a loop's body or a conditional's branch, or in what they call."""
    if SOLVER.search(text):
        return True
    bodies: dict[str, str] = {}
    for block in re.split(r"\n(?=%|ENTRY)", text):
        header = re.match(r"(?:ENTRY )?%?([^\s(]+)", block)
        if header:
            bodies[header.group(1)] = block
    pending = [n.strip().lstrip("%") for m in REPEATED.finditer(text) for n in m.group(1).split(",")]
    seen: set[str] = set()
    while pending:
        computation = pending.pop()
        if computation in seen or computation not in bodies:
            continue
        seen.add(computation)
        body = bodies[computation]
        if re.search(r"\b(dot|convolution)\(", body):
            return True
        pending += re.findall(r"(?:calls|to_apply|body|condition)=%([^\s,}]+)", body)
        pending += [n.strip().lstrip("%") for m in REPEATED.finditer(body) for n in m.group(1).split(",")]
    return False


def compiled_flops(compiled: Any) -> float | str:
    """The floating-point operations XLA's cost analysis counts in a compiled program (a dot of ``m x k`` by
    ``k x n`` counts ``2 m k n``): the arithmetic a program does, beside the time it takes, says whether a ratio of
    times is one of work or of efficiency. ``"n/a"`` where the backend has no analysis, and where its count would
    be wrong: a solver, or a product inside a loop or a conditional (a random draw's loop leaves the count right)."""
    try:
        text = compiled.as_text() or ""
    except Exception:  # some backends do not implement it
        return "n/a"
    flops = cost_analysis(compiled).get("flops")
    if not isinstance(flops, int | float) or flops <= 0 or _miscounted(text):
        return "n/a"
    return float(flops)
