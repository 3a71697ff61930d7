"""What XLA says about a compiled program (its memory analysis) and how long it takes (the median of timed calls),
shared by the checks, the benchmarks and training.
"""

from __future__ import annotations

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
