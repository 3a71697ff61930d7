"""The benchmark suite: every row's plan, the run, and the table it prints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import jax.numpy as jnp

from mnet.bench import curvature, decoder, memory, versus
from mnet.bench.gradients import (
    row_cnn_step,
    row_compile_time,
    row_fused_training,
    row_jacobian,
    row_ntk,
    row_per_example_grads,
    row_per_example_norms,
    row_training_step,
    row_transformer_step,
)
from mnet.bench.timing import PEAK_SIZES, Row, machine, matmul_peak, with_memory
from mnet.compiled import NOT_AVAILABLE
from mnet.errors import SettingError


def run(quick: bool = False, only: set[str] | None = None, large: bool = False, peers: bool = False) -> dict:
    """Run the suite. ``quick`` shrinks sizes and repetitions to a smoke test of every row (about 70 s on 2 CPU
    cores, most of it compiling: one to nine seconds a row);
    ``large`` adds the accelerator-sized training step (MLP 4096-4096-4096-4096, batch 4096, float32 and bfloat16);
    ``peers`` adds the rows P1 to P3 beside the PyTorch tools (:mod:`mnet.bench.versus`), each peer skipped with
    its reason where it is not installed."""
    r = 3 if quick else 30
    plans: dict[str, Callable[[], Row]] = {
        "W1": lambda: row_training_step(
            [784, 128, 128, 10] if quick else [784, 1024, 1024, 10], 64 if quick else 256, r
        ),
        "W1bf16": lambda: row_training_step(
            [784, 128, 128, 10] if quick else [784, 1024, 1024, 10], 64 if quick else 256, r, "bfloat16", "W1bf16"
        ),
        "W2": lambda: row_fused_training([64, 32, 10], 64, 50 if quick else 1000, r if quick else 15),
        "W3": lambda: row_compile_time([784, 128, 10] if quick else [784, 1024, 1024, 10], 32, 2 if quick else 5),
        "D1": lambda: row_per_example_norms([784, 64, 10] if quick else [784, 512, 512, 10], 32 if quick else 256, r),
        "D2": lambda: row_per_example_grads([784, 64, 10] if quick else [784, 512, 512, 10], 32 if quick else 256, r),
        "D3": lambda: row_ntk([32, 64, 64, 8], 16, r, "D3", forward_mode=not quick),
        "D3w": lambda: row_ntk(
            [32, 128, 128, 8] if quick else [32, 512, 512, 8], 16, 3 if quick else 7, "D3w", forward_mode=False
        ),
        "D4": lambda: row_jacobian([32, 64, 64, 8], 16, r, forward_mode=not quick),
        "C1": lambda: row_cnn_step(16 if quick else 128, r),
        "T1": lambda: row_transformer_step(16 if quick else 128, 9, r),
    }
    plans.update(curvature.plans(quick, r))
    plans["M1"] = lambda: decoder.row_decoder(quick, 3 if quick else 5)
    plans.update(memory.plans(quick, r))
    if large:
        plans["L1"] = lambda: row_training_step([4096, 4096, 4096, 4096], 4096, 10, None, "L1")
        plans["L1bf16"] = lambda: row_training_step([4096, 4096, 4096, 4096], 4096, 10, "bfloat16", "L1bf16")
    if peers:
        plans.update(versus.plans(quick, min(r, 10)))
    unknown = sorted((only or set()) - set(plans))
    if unknown:
        hint = "" if peers else " (P1 to P3 need --peers)"
        raise SettingError(f"unknown benchmark row(s) {', '.join(unknown)}; known: {', '.join(plans)}{hint}")
    rows = [with_memory(plan) for name, plan in plans.items() if only is None or name in only]
    sizes, rounds = ((128, 256, 512), 3) if quick else (PEAK_SIZES, 10)
    peaks = matmul_peak(sizes, rounds)
    dtypes = {row.extra.get("peak_dtype", "float32") for row in rows} - {"float32"}
    other_peaks = {name: max(matmul_peak(sizes, rounds, jnp.dtype(name)).values()) for name in sorted(dtypes)}
    return {
        "machine": machine(),
        "matmul_peak_gflops": max(peaks.values()),
        "matmul_peak_by_size": {str(n): g for n, g in peaks.items()},
        "matmul_peak_gflops_by_dtype": {"float32": max(peaks.values()), **other_peaks},
        "quick": quick,
        "rows": [{**asdict(row), "ratios": row.ratios(), "work": row.work()} for row in rows],
    }


def contender_figures(row: dict, name: str, peaks: dict[str, float]) -> tuple[str, str]:
    """``(median time, throughput note)`` of one contender of a result row, as both renderings show them; the
    throughput against the matmul peak of the row's own dtype."""
    seconds = row["seconds"][name]
    note = ""
    if "gflops_per_s" in row["extra"]:
        g = row["extra"]["gflops_per_s"][name]
        dtype = row["extra"].get("peak_dtype", "float32")
        note = f"{g:.1f} GFLOP/s = {g / peaks[dtype]:.0%} of the {dtype} peak"
    elif "steps_per_s" in row["extra"]:
        note = f"{row['extra']['steps_per_s'][name]:,.0f} steps/s"
    if "agreement" in row["extra"]:  # a peer row (mnet.bench.versus)
        own = row["extra"]["per_own_gradient"].get(name)
        note = f"agrees to {row['extra']['agreement'][name]:.1e}" + (
            f"; {own:.2f}x its framework's gradient" if own is not None else ""
        )
    return (f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.3f} s"), note


def format_table(result: dict) -> str:
    peak = result["matmul_peak_gflops"]
    peaks = result.get("matmul_peak_gflops_by_dtype", {"float32": peak})
    lines = [
        f"machine: {result['machine']['processor']}, {result['machine']['cpu_count']} cores, "
        f"backend {result['machine']['backend']}, jax {result['machine']['jax']}; "
        f"measured float32 matmul peak {peak:.1f} GFLOP/s (best of sizes "
        + ", ".join(f"{n}: {g:.0f}" for n, g in result.get("matmul_peak_by_size", {}).items())
        + ")"
        + "".join(f"; {name} peak {g:.1f} GFLOP/s" for name, g in peaks.items() if name != "float32"),
        "",
    ]
    # The contender column as wide as its longest name, so that no name runs into the figures after it.
    width = max([len(name) + 2 for row in result["rows"] for name in row["seconds"]] + [22])
    header = f"{'row':<5}{'contender':<{width}}{'median':>12}{'speed-up':>10}{'flops':>8}{'temp MB':>10}{'peak MB':>10}  notes"
    lines += [header, "-" * len(header)]
    for row in result["rows"]:
        lines.append(f"{row['name']} {row['description']}")  # a space whatever the name's length (W1bf16, M1-256)
        lines += [
            f"{'':<5}{peer} {reason}"
            for peer, reason in row["extra"].get("peers", {}).items()
            if reason.startswith("skipped")
        ]
        for name in row["seconds"]:
            time_text, note = contender_figures(row, name, peaks)
            memory = row.get("memory", {}).get(name, NOT_AVAILABLE)
            temp, peak_bytes = (_megabytes(memory[key]) for key in ("temp_bytes", "peak_bytes"))
            work = row.get("work", {}).get(name, "n/a")
            work_text = f"{work:.2f}x" if isinstance(work, float) else work
            lines.append(
                f"{'':<5}{name:<{width}}{time_text:>12}{row['ratios'][name]:>9.2f}x{work_text:>8}{temp:>10}"
                f"{peak_bytes:>10}  {note}".rstrip()
            )
    return "\n".join(lines)


def _megabytes(value: int | str) -> str:
    return f"{value / 1e6:.2f}" if isinstance(value, int) else str(value)
