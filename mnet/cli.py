"""The command line: parses options, calls the library, prints. No mathematics here.

Every subcommand exits 0 on success; bad input prints one line ``mnet <command>: error: ...`` on stderr, with no
traceback, and exits 2 (``mnet check`` exits 1 when the gradients disagree).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from mnet.errors import MnetError

EXIT_DISAGREE = 1
EXIT_ERROR = 2


class UsageError(Exception):
    """Bad command-line input, reported as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr and exit status 2, without the usage block."""

    def error(self, message: str):
        raise UsageError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _widths(text: str) -> list[int]:
    try:
        widths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 64,128,10, got {text!r}") from None
    if not widths or any(w <= 0 for w in widths):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 64,128,10, got {text!r}")
    return widths


def _set_dtype(dtype: str) -> None:
    import jax

    jax.config.update("jax_enable_x64", dtype == "float64")


def run_check(args: argparse.Namespace) -> int:
    _set_dtype(args.dtype)
    import jax
    import jax.numpy as jnp

    import mnet

    if len(args.layers) < 2:
        raise UsageError("--layers needs the input width and at least one layer width, e.g. 64,128,10")
    if args.loss == "softmax_cross_entropy" and args.layers[-1] < 2:
        raise UsageError("softmax_cross_entropy needs at least 2 output classes (last --layers entry)")
    net = mnet.mlp(args.layers[1:], args.activation)
    loss = mnet.losses.get(args.loss)
    dtype = jnp.dtype(args.dtype)
    k_init, k_x, k_t = jax.random.split(jax.random.key(args.seed), 3)
    _, params = net.init(k_init, (args.layers[0],), dtype)
    x = jax.random.normal(k_x, (args.batch, args.layers[0]), dtype)
    outputs = (args.batch, args.layers[-1])
    if loss is mnet.losses.softmax_cross_entropy:
        targets = jax.random.randint(k_t, (args.batch,), 0, args.layers[-1])
    elif loss is mnet.losses.sigmoid_binary_cross_entropy:
        targets = jax.random.uniform(k_t, outputs, dtype)
    else:
        targets = jax.random.normal(k_t, outputs, dtype)
    report = mnet.compare_gradients(net, loss, params, x, targets, finite_differences=args.finite_differences,
                                    seed=args.seed)
    result = report.to_dict()
    result["network"] = repr(net)
    if args.cost:
        result["cost"] = mnet.compare_cost(net, loss, params, x, targets)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"network {net!r}, input width {args.layers[0]}, loss {args.loss}, batch {args.batch}")
        print(report)
        if args.cost:
            print(_format_cost(result["cost"]))
    return 0 if report.ok else EXIT_DISAGREE


def _format_cost(cost: dict) -> str:
    lines = ["", f"{'compiled gradient':<18}{'GFLOP':>10}{'MB accessed':>13}{'compile s':>11}{'median us':>11}"]
    for name in ("hand", "autodiff"):
        c = cost[name]
        lines.append(f"{name:<18}{c['flops'] / 1e9:>10.4f}{c['bytes_accessed'] / 1e6:>13.3f}"
                     f"{c['compile_seconds']:>11.3f}{c['seconds'] * 1e6:>11.1f}")
    lines.append(f"hand / autodiff time: {cost['time_ratio']:.3f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from mnet import losses
    from mnet.layers import ACTIVATIONS_BY_NAME

    parser = _Parser(prog="mnet", description="Hand-derived neural network gradients, checked against jax.grad.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    check = commands.add_parser("check", help="compare hand-derived and autodiff gradients on an MLP")
    check.add_argument("--layers", type=_widths, default=[64, 128, 64, 10],
                       help="input width then layer widths (default 64,128,64,10)")
    check.add_argument("--activation", choices=sorted(ACTIVATIONS_BY_NAME), default="relu")
    check.add_argument("--loss", choices=sorted(losses.BY_NAME), default="softmax_cross_entropy")
    check.add_argument("--batch", type=_positive_int, default=32)
    check.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--finite-differences", action="store_true", help="also compare with float64 central differences")
    check.add_argument("--cost", action="store_true", help="also compare XLA cost analysis and time")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(run=run_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    prog = f"mnet {command}".strip()
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except (MnetError, ValueError, OSError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
