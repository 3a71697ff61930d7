"""Benchmarks: hand-derived against autodiff (and optional other frameworks), side by side in one process.

Method: every contender is compiled and warmed up first; then the contenders of a row are timed in turn,
round after round (interleaved, so drift and noise hit all of them alike), each sample preceded by one untimed
call and long enough (calibrated number of calls) that dispatch overhead does not dominate, and each reports
the median of its rounds. Throughput is set against the machine's float32 matmul peak measured in the same run: the
best GFLOP/s of jitted square products of several sizes, each the fastest of its samples (:func:`matmul_peak`). Like :mod:`mnet.checking`, this module calls ``jax.grad``: autodiff is a contender.
"""

from __future__ import annotations

import contextvars
import functools
import math
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from mnet.compiled import NOT_AVAILABLE, compiled_flops, compiled_memory


@dataclass
class Row:
    """One workload: its contenders' median seconds per call, and derived figures."""

    name: str
    description: str
    seconds: dict[str, float]
    baseline: str
    extra: dict = field(default_factory=dict)
    #: Each contender's XLA memory analysis (:func:`mnet.compiled.compiled_memory`): ``temp_bytes`` and
    #: ``peak_bytes``, or "n/a" (a contender that is not one compiled program, or a backend without the analysis).
    memory: dict = field(default_factory=dict)
    #: Each contender's floating-point operations by XLA's cost analysis (:func:`mnet.compiled.compiled_flops`), or
    #: "n/a" where it is no single compiled program.
    flops: dict = field(default_factory=dict)

    def ratios(self) -> dict[str, float]:
        """Each contender's speed-up over the baseline (baseline time / contender time)."""
        base = self.seconds[self.baseline]
        return {name: base / s for name, s in self.seconds.items()}

    def work(self) -> dict[str, float | str]:
        """Each contender's flops as a multiple of the baseline's ("n/a" where either has no count): set beside
        the time ratio, it tells more arithmetic from less efficient arithmetic."""
        base = self.flops.get(self.baseline, "n/a")
        return {
            name: self.flops[name] / base
            if isinstance(base, float) and isinstance(self.flops.get(name), float)
            else "n/a"
            for name in self.seconds
        }


#: Each timing sample lasts at least this long (as timeit's autorange): a single call of a millisecond-scale
#: function is dominated by dispatch and synchronisation, which once inflated a 2.7 ms function to 6 ms.
SAMPLE_SECONDS = 0.02


def interleaved_samples(
    contenders: Mapping[str, Callable[[], object]], rounds: int, number: int | None = None
) -> dict[str, list[float]]:
    """Seconds per call of each contender, one sample per round, the contenders interleaved round by round.

    Each sample times ``number`` back-to-back calls; by default ``number`` is calibrated per contender so that
    a sample lasts at least :data:`SAMPLE_SECONDS`.
    """
    numbers = {}
    contenders = {name: _ahead_of_time(name, fn) for name, fn in contenders.items()}
    for name, fn in contenders.items():  # compile, warm up, calibrate
        jax.block_until_ready(fn())
        start = time.perf_counter()
        jax.block_until_ready(fn())
        once = time.perf_counter() - start
        numbers[name] = number or max(1, min(1000, math.ceil(SAMPLE_SECONDS / max(once, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            # Untimed calls first, as many as a sample's: the contender before may have left caches and the allocator in
            # a state that lasts tens of milliseconds, longer than one call (after a 351 MB per-example diag GGN a 3.2
            # ms gradient took 7-10 ms for a 20 ms sample that followed one untimed call: G1's baseline once read 4.5
            # ms, and cheap quantities looked cheaper than a gradient).
            for _ in range(numbers[name]):
                out = fn()
            jax.block_until_ready(out)
            start = time.perf_counter()
            for _ in range(numbers[name]):
                out = fn()
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - start) / numbers[name])
    return samples


#: While a row runs (:func:`run`), the memory analysis of every contender it times, by name.
_ROW_MEMORY: contextvars.ContextVar[dict | None] = contextvars.ContextVar("row_memory", default=None)


def _ahead_of_time(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    """A contender that calls a jitted function on fixed arguments, compiled ahead of time so that XLA's memory
    analysis of exactly the program being timed is read without compiling it twice; it is recorded for the row
    being run. Any other contender (a Python loop, another framework) is timed as it is, its memory "n/a"."""
    memory: dict[str, int | str] = dict(NOT_AVAILABLE)
    flops: float | str = "n/a"
    timed = fn
    if isinstance(fn, functools.partial) and hasattr(fn.func, "lower"):
        try:
            compiled = fn.func.lower(*fn.args, **fn.keywords).compile()
            candidate = functools.partial(compiled, *fn.args, **fn.keywords)
            jax.block_until_ready(candidate())
            memory, flops, timed = compiled_memory(compiled), compiled_flops(compiled), candidate
        except Exception:  # static arguments or donation the executable cannot take: time the jitted call
            pass
    recorder = _ROW_MEMORY.get()
    if recorder is not None:
        recorder[name] = (memory, flops)
    return timed


def with_memory(plan: Callable[[], Row]) -> Row:
    """Run one row's plan, then attach the memory and cost analyses of each of its contenders: what the row set
    itself, else what its timing recorded, else "n/a" (a contender that is no single compiled program, such as a
    Python loop of steps or another framework)."""
    token = _ROW_MEMORY.set({})
    try:
        row = plan()
        recorded = _ROW_MEMORY.get() or {}
    finally:
        _ROW_MEMORY.reset(token)
    missing = (NOT_AVAILABLE, "n/a")
    row.memory = {name: row.memory.get(name, recorded.get(name, missing)[0]) for name in row.seconds}
    row.flops = {name: row.flops.get(name, recorded.get(name, missing)[1]) for name in row.seconds}
    return row


def interleaved_medians(
    contenders: Mapping[str, Callable[[], object]], rounds: int, number: int | None = None
) -> dict[str, float]:
    """Median seconds per call of each contender (:func:`interleaved_samples`)."""
    return {name: statistics.median(values) for name, values in interleaved_samples(contenders, rounds, number).items()}


#: Square matmul sizes whose best throughput is the machine's peak (a single 2048^3 product once measured 188
#: GFLOP/s while a training step's smaller products reached 206: one size and a median is no peak).
PEAK_SIZES = (512, 1024, 1536, 2048)


def matmul_peak(sizes: tuple[int, ...] = PEAK_SIZES, rounds: int = 10, dtype=jnp.float32) -> dict[int, float]:
    """GFLOP/s of a jitted ``n x n x n`` product (``2 n^3`` flops) for each size: the fastest of ``rounds`` samples,
    the sizes interleaved. The peak is the largest of them."""
    products: dict[str, Callable[[], object]] = {}
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        products[str(n)] = functools.partial(jax.jit(jnp.matmul), a, b)
    samples = interleaved_samples(products, rounds)
    return {int(n): 2 * int(n) ** 3 / min(values) / 1e9 for n, values in samples.items()}


def machine() -> dict:
    devices = jax.devices()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in devices],
    }
