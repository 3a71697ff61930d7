"""Run mnet's benchmark suite (the same as `mnet bench`) and render it as Markdown for BENCHMARKS.md.

    python experiments/benchmark.py [--quick] [--large] [--from-json results.json] [--save-json out.json]

Prints the Markdown tables: every row's contenders with median time, speed-up over the row's baseline and,
for training steps, GFLOP/s as a fraction of the float32 matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from mnet.bench.suite import contender_figures


def markdown(result: dict) -> str:
    m = result["machine"]
    peak = result["matmul_peak_gflops"]
    lines = [f"Machine: {m['processor']}, {m['cpu_count']} cores, {m['platform']}; backend {m['backend']} "
             f"({', '.join(sorted(set(m['devices'])))}); jax {m['jax']}. Measured float32 matmul peak "
             f"(jitted 2048^3 product): **{peak:.1f} GFLOP/s**.", "",
             "| row | workload | contender | median | speed-up vs baseline | throughput |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        for index, name in enumerate(row["seconds"]):
            time_text, note = contender_figures(row, name, peak)
            baseline = " (baseline)" if name == row["baseline"] else ""
            lines.append(f"| {row['name'] if index == 0 else ''} | {row['description'] if index == 0 else ''} | "
                         f"{name}{baseline} | {time_text} | {row['ratios'][name]:.2f}x | {note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--large", action="store_true")
    parser.add_argument("--from-json", type=Path, default=None, help="render saved `mnet bench --json` output")
    parser.add_argument("--save-json", type=Path, default=None)
    args = parser.parse_args()
    if args.from_json:
        result = json.loads(args.from_json.read_text())
    else:
        from mnet.bench.suite import run

        result = run(quick=args.quick, large=args.large)
    if args.save_json:
        args.save_json.write_text(json.dumps(result))
    print(f"Measured {datetime.date.today().isoformat()}.\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
