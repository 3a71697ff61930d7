"""``mnet bench``: hand-derived against autodiff, side by side in one process."""

from __future__ import annotations

import argparse
import json

from mnet.bench import suite


def run_bench(args: argparse.Namespace) -> int:

    rows = set(args.rows.split(",")) if args.rows else None
    result = suite.run(quick=args.quick, only=rows, large=args.large, peers=args.peers)
    if args.json:
        print(json.dumps(result))
    else:
        print(suite.format_table(result))
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``mnet bench`` and its options."""
    bench = commands.add_parser("bench", help="hand-derived vs autodiff benchmarks, side by side")
    bench.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, few repetitions, for a smoke test: every row in about a minute on 2 CPU cores (most of it "
        "compiling)",
    )
    bench.add_argument("--rows", default=None, help="comma-separated subset, e.g. W1,D1 (default: all)")
    bench.add_argument("--large", action="store_true", help="add the width-4096 batch-4096 rows (for accelerators)")
    bench.add_argument(
        "--peers",
        action="store_true",
        help="add rows P1-P3: mnet beside BackPACK, curvlinops, Opacus and torch.func (pip install '.[peers]'), "
        "each checked to agree first; peers not installed are skipped with the reason",
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(run=run_bench)
