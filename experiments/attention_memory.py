"""Temporary memory of one transformer training step against the sequence length: hand-derived with blockwise
attention, hand-derived with unblocked attention, and ``jax.grad`` (the ``mnet bench`` M1 contenders), from XLA's
memory analysis of the compiled programs (nothing is run, so the largest lengths cost only their compilation).

    python experiments/attention_memory.py [--lengths 256 512 1024 2048 4096] [--out experiments/out] [--quick]

Prints a table and writes ``attention_memory.png`` (log-log); ``--quick`` compiles two short lengths.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mnet.bench.memory import BATCH, BLOCK, HEADS, WIDTH, memory_problem
from mnet.compiled import compiled_memory


def measure(lengths: list[int]) -> dict[str, list[float]]:
    """Megabytes of temporary memory per contender, one entry per length."""
    figures: dict[str, list[float]] = {}
    for length in lengths:
        for name, step in memory_problem(length).items():
            memory = compiled_memory(step.func.lower(*step.args).compile())  # type: ignore[attr-defined]
            if memory == "n/a":
                raise SystemExit("attention_memory: this backend reports no memory analysis")
            figures.setdefault(name, []).append(memory["temp_bytes"] / 1e6)
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--out", type=Path, default=Path("experiments/out"))
    parser.add_argument("--quick", action="store_true", help="two short lengths: a smoke test")
    args = parser.parse_args(argv)
    lengths = [128, 256] if args.quick else args.lengths
    figures = measure(lengths)
    print(f"temporary MB of one training step (width {WIDTH}, {HEADS} heads, batch {BATCH}, blocks of {BLOCK}):")
    print(f"{'T':>6}" + "".join(f"{name:>18}" for name in figures) + f"{'blockwise/grad':>16}")
    for index, length in enumerate(lengths):
        ratio = figures["hand blockwise"][index] / figures["jax.grad"][index]
        print(f"{length:>6}" + "".join(f"{values[index]:>18.1f}" for values in figures.values()) + f"{ratio:>16.3f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.6, 3.8))
    for (name, values), marker in zip(figures.items(), "os^"):
        axis.loglog(lengths, values, marker + "-", label=name, base=2)
    axis.set_xlabel("sequence length T")
    axis.set_ylabel("temporary memory of one step (MB)")
    axis.set_title(f"transformer step, width {WIDTH}, {HEADS} heads, batch {BATCH}", fontsize=9)
    axis.grid(alpha=0.3, which="both")
    axis.legend()
    figure.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out / "attention_memory.png", dpi=110)
    plt.close(figure)
    return {"lengths": lengths, "megabytes": figures}


if __name__ == "__main__":
    main()
