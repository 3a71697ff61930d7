"""The command line: parses options, calls the library, prints. No mathematics here.

Every subcommand exits 0 on success; bad input prints one line ``mnet <command>: error: ...`` on stderr, with no
traceback, and exits 2 (``mnet check`` exits 1 when the gradients disagree).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from mnet.errors import DivergenceError, MnetError

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
    loss = mnet.losses.get(args.loss)
    if loss is mnet.losses.softmax_cross_entropy and args.layers[-1] < 2:
        raise UsageError("softmax_cross_entropy needs at least 2 output classes (last --layers entry)")
    net = mnet.mlp(args.layers[1:], args.activation)
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


OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


def make_optimizer(name: str, lr: float):
    import optax

    return {
        "sgd": lambda: optax.sgd(lr),
        "momentum": lambda: optax.sgd(lr, momentum=0.9, nesterov=True),
        "adam": lambda: optax.adam(lr),
        "adamw": lambda: optax.adamw(lr, weight_decay=1e-4),
    }[name]()


def _hidden_widths(text: str) -> list[int]:
    return [] if text.strip() in ("", "none") else _widths(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def run_train(args: argparse.Namespace) -> int:
    import jax

    import mnet
    from mnet import data, train

    if args.resume and not args.checkpoint:
        raise UsageError("--resume needs --checkpoint PATH")
    dataset = data.load(args.data, seed=args.seed, label_column=args.label_column)
    if args.batch_size > len(dataset.x_train):
        raise UsageError(f"--batch-size {args.batch_size} exceeds the {len(dataset.x_train)} training examples")
    layers = ([mnet.Flatten()] if len(dataset.example_shape) > 1 else []) + list(
        mnet.mlp(args.layers + [dataset.num_classes], args.activation, args.compute_dtype).layers)
    net = mnet.serial(*layers)
    loss = mnet.losses.softmax_cross_entropy
    _, params = net.init(jax.random.key(args.seed), dataset.example_shape)
    say = (lambda text: print(text, file=sys.stderr)) if args.json else print
    say(f"{dataset}")
    say(f"network {net!r}, {args.optimizer} lr {args.lr}, batch {args.batch_size}, {args.grad} gradients")

    check_batch = min(args.batch_size, len(dataset.x_train))
    report = mnet.compare_gradients(net, loss, params, jax.numpy.asarray(dataset.x_train[:check_batch]),
                                    jax.numpy.asarray(dataset.y_train[:check_batch]), layer_by_layer=False)
    worst = max(row.autodiff.max_rel_error for row in report.rows)
    say(f"gradient check on one batch of {check_batch}: hand-derived vs jax.grad, largest relative error "
        f"{worst:.2e} over {len(report.rows)} leaves (tolerance {report.rows[0].autodiff.tolerance:.1e}): "
        + ("agree" if report.ok else "DISAGREE"))
    if not report.ok:
        print(report, file=sys.stderr)
        raise UsageError("hand-derived gradients disagree with jax.grad; not training")

    progress = None
    if sys.stderr.isatty() and not args.json:
        import shutil

        from tqdm import tqdm

        # A terminal that reports a 0 x 0 size (some pseudo-terminals do) makes tqdm hide its bar; shutil falls
        # back to 80 x 24 there.
        columns, rows = shutil.get_terminal_size()
        progress = tqdm(total=args.epochs, unit="epoch", file=sys.stderr, ncols=columns, nrows=rows)

    def on_epoch(epoch: int, record: dict) -> None:
        line = (f"epoch {epoch}/{args.epochs}  train loss {record['train_loss']:.4f}  train acc "
                f"{record['train_accuracy']:.4f}  test loss {record['test_loss']:.4f}  test acc "
                f"{record['test_accuracy']:.4f}")
        if progress is not None:
            progress.n = epoch
            progress.set_postfix(loss=f"{record['train_loss']:.4f}", test_acc=f"{record['test_accuracy']:.4f}")
        else:
            say(line)

    config = {"data": str(args.data), "layers": args.layers, "activation": args.activation,
              "compute_dtype": args.compute_dtype,
              "optimizer": args.optimizer, "lr": args.lr, "grad": args.grad}
    try:
        result = train.fit(net, loss, params, dataset, optimizer=make_optimizer(args.optimizer, args.lr),
                           epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, grad=args.grad,
                           checkpoint_path=args.checkpoint, resume=args.resume, config=config, on_epoch=on_epoch,
                           devices=args.devices)
    finally:
        if progress is not None:
            progress.close()
    history = result.history
    if args.plot:
        train.plot_history(history, args.plot, f"{dataset.name}: {net!r}")
    if args.save_params:
        mnet.save_params(args.save_params, result.params)
    final = history.last()
    if not final:
        say(f"nothing to do: the checkpoint already holds {args.epochs} epochs")
        final = {}
    summary = {"test_accuracy": final.get("test_accuracy"), "train_loss": final.get("train_loss"),
               "test_loss": final.get("test_loss"), "train_accuracy": final.get("train_accuracy"),
               "epochs": args.epochs, "grad": args.grad, "gradient_check_max_rel_error": worst,
               "seconds": sum(history.seconds)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"done: test accuracy {summary['test_accuracy']:.4f}, train loss {summary['train_loss']:.4f}, "
              f"{summary['seconds']:.2f}s of training")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from mnet import bench

    rows = set(args.rows.split(",")) if args.rows else None
    result = bench.run(quick=args.quick, only=rows, large=args.large)
    if args.json:
        print(json.dumps(result))
    else:
        print(bench.format_table(result))
    return 0


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

    train = commands.add_parser("train", help="train an MLP classifier (default: the bundled digits)")
    train.add_argument("--data", default=None, metavar="PATH",
                       help=".npz (x, y[, x_test, y_test]), .csv, or MNIST-style IDX file/directory; default digits")
    train.add_argument("--label-column", default=None, help="CSV label column (name or 0-based index)")
    train.add_argument("--layers", type=_hidden_widths, default=[256],
                       help="hidden widths, e.g. 256,128 (the output width is the number of classes; default 256)")
    train.add_argument("--activation", choices=sorted(ACTIVATIONS_BY_NAME), default="relu")
    train.add_argument("--epochs", type=_positive_int, default=40)
    train.add_argument("--batch-size", type=_positive_int, default=32)
    train.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    train.add_argument("--lr", type=_positive_float, default=1e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--grad", choices=["manual", "autodiff"], default="manual")
    train.add_argument("--checkpoint", default=None, metavar="PATH", help="training checkpoint, written every epoch")
    train.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    train.add_argument("--save-params", default=None, metavar="PATH", help="write the final parameters here")
    train.add_argument("--plot", default=None, metavar="PATH", help="loss and accuracy curves (PNG)")
    train.add_argument("--compute-dtype", choices=["bfloat16", "float16"], default=None,
                       help="mixed precision: products in this dtype, float32 parameters and accumulation")
    train.add_argument("--devices", type=int, default=None, metavar="N",
                       help="data-parallel over N devices (0: all available); default: one device")
    train.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    train.set_defaults(run=run_train)

    bench = commands.add_parser("bench", help="hand-derived vs autodiff benchmarks, side by side")
    bench.add_argument("--quick", action="store_true", help="small sizes, few repetitions: seconds, for a smoke test")
    bench.add_argument("--rows", default=None, help="comma-separated subset, e.g. W1,D1 (default: all)")
    bench.add_argument("--large", action="store_true", help="add the width-4096 batch-4096 rows (for accelerators)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(run=run_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    prog = f"mnet {command}".strip()
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except (UsageError, MnetError, ValueError, OSError) as error:
        # One line whatever the message holds (JAX's own messages often span several).
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_DISAGREE if isinstance(error, DivergenceError) else EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
