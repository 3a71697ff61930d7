"""``mnet check``: the hand-derived gradient of any network against ``jax.grad`` (and finite differences, and cost)."""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

import mnet
from mnet import losses
from mnet.cli.common import (
    EXIT_DISAGREE,
    UsageError,
    hidden_widths,
    positive_int,
    set_dtype,
    shape,
    user_network,
    widths,
)
from mnet.core.protocol import init_layer
from mnet.layers.elementwise import ACTIVATIONS_BY_NAME

#: ``mnet check``'s MLP: 64 inputs, these hidden widths, 10 outputs.
DEFAULT_HIDDEN = [128, 64]


def check_problem(args: argparse.Namespace):
    """``(net, example_shape, description)`` for ``mnet check``: an MLP from ``--layers``, a built-in model, or a
    user's network with ``--input-shape``."""

    if args.model is None or args.model == "mlp":
        hidden, inputs, outputs = args.layers, args.input_shape or (64,), args.outputs
        if args.widths is not None:
            if len(args.widths) < 2:
                raise UsageError("--widths needs the input width and at least one layer width, e.g. 64,128,10")
            inputs, hidden, outputs = (args.widths[0],), args.widths[1:-1], args.widths[-1]
            shown = ",".join(map(str, hidden)) or "none"
            print(
                f"note: --widths is deprecated; it means --input-shape {inputs[0]} --layers {shown} --outputs {outputs}"
                " (--layers lists hidden widths, as in mnet train)",
                file=sys.stderr,
            )
        if len(inputs) != 1:
            raise UsageError(f"--model mlp takes vectors: --input-shape must be one width, got {inputs}")
        return mnet.mlp([*hidden, outputs], args.activation), inputs, f"input width {inputs[0]}"
    if args.widths is not None or args.outputs != 10 or args.layers != DEFAULT_HIDDEN:
        raise UsageError(f"--layers, --widths and --outputs build --model mlp only, not --model {args.model}")
    if args.model == "cnn":
        return mnet.models.digits_cnn(), args.input_shape or (64,), "the digits CNN"
    if args.model == "transformer":
        return mnet.models.transformer_classifier(16, 16), args.input_shape or (9,), "the transformer classifier"
    if args.input_shape is None:
        raise UsageError(f"--model {args.model}: give one example's shape with --input-shape, e.g. 8,8,1")
    return user_network(args.model), args.input_shape, f"{args.model}"


def run_check(args: argparse.Namespace) -> int:
    set_dtype(args.dtype)

    loss = mnet.losses.get(args.loss)
    net, example_shape, source = check_problem(args)
    dtype = jnp.dtype(args.dtype)
    k_init, k_x, k_t = jax.random.split(jax.random.key(args.seed), 3)
    _, params = init_layer(net, k_init, example_shape, dtype)
    vocab = getattr(net, "input_vocab", None)
    x = (
        jax.random.randint(k_x, (args.batch, *example_shape), 0, vocab)
        if vocab is not None
        else jax.random.normal(k_x, (args.batch, *example_shape), dtype)
    )
    targets = loss.random_targets(jax.eval_shape(lambda p, inputs: net.forward(p, inputs)[0], params, x), k_t)
    report = mnet.compare_gradients(
        net, loss, params, x, targets, finite_differences=args.finite_differences, seed=args.seed
    )
    result = report.to_dict()
    result["network"] = repr(net)
    if args.cost:
        result["cost"] = mnet.compare_cost(net, loss, params, x, targets)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"network {net!r}, {source}, loss {args.loss}, batch {args.batch}")
        print(report)
        if args.cost:
            print(format_cost(result["cost"]))
    return 0 if report.ok else EXIT_DISAGREE


def format_cost(cost: dict) -> str:
    def megabytes(value: int | str) -> str:
        return f"{value / 1e6:.3f}" if isinstance(value, int) else str(value)

    lines = [
        "",
        f"{'compiled gradient':<18}{'GFLOP':>10}{'MB accessed':>13}{'temp MB':>10}{'peak MB':>10}"
        f"{'compile s':>11}{'median us':>11}",
    ]
    for name in ("hand", "autodiff"):
        c = cost[name]
        lines.append(
            f"{name:<18}{c['flops'] / 1e9:>10.4f}{c['bytes_accessed'] / 1e6:>13.3f}{megabytes(c['temp_bytes']):>10}"
            f"{megabytes(c['peak_bytes']):>10}{c['compile_seconds']:>11.3f}{c['seconds'] * 1e6:>11.1f}"
        )
    ratio = cost["memory_ratio"]
    lines.append(
        f"hand / autodiff time: {cost['time_ratio']:.3f}; temporary memory: "
        + (f"{ratio:.3f}" if isinstance(ratio, float) else str(ratio))
    )
    return "\n".join(lines)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``mnet check`` and its options."""
    check = commands.add_parser("check", help="compare hand-derived and autodiff gradients of any network")
    check.add_argument(
        "--layers",
        type=hidden_widths,
        default=DEFAULT_HIDDEN,
        help="for the MLP: hidden widths (default 128,64), as in mnet train; the input width is --input-shape "
        "(default 64), the output width --outputs",
    )
    check.add_argument("--outputs", type=positive_int, default=10, help="for the MLP: the output width (default 10)")
    check.add_argument(
        "--widths", type=widths, default=None, help="deprecated: input width, hidden widths, output width (64,128,10)"
    )
    check.add_argument(
        "--model",
        "--net",
        dest="model",
        default=None,
        metavar="NAME|MODULE:ATTR",
        help="mlp (default, from --layers), cnn, transformer, or a user's network MODULE:ATTR "
        "(a layer, or a function of no arguments returning one)",
    )
    check.add_argument(
        "--input-shape",
        type=shape,
        default=None,
        metavar="D1,D2,...",
        help="one example's shape for --model MODULE:ATTR, e.g. 8,8,1 (for the MLP: its input width, default 64)",
    )
    check.add_argument("--activation", choices=sorted(ACTIVATIONS_BY_NAME), default="relu")
    check.add_argument("--loss", choices=sorted(losses.BY_NAME), default="softmax_cross_entropy")
    check.add_argument("--batch", type=positive_int, default=32)
    check.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument(
        "--finite-differences", action="store_true", help="also compare with float64 central differences"
    )
    check.add_argument("--cost", action="store_true", help="also compare XLA cost analysis and time")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(run=run_check)
