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
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers like 64,128,10, got {text!r}"
        ) from None
    if not widths or any(w <= 0 for w in widths):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 64,128,10, got {text!r}")
    return widths


def _set_dtype(dtype: str) -> None:
    import jax

    jax.config.update("jax_enable_x64", dtype == "float64")


BUILT_IN_MODELS = ("mlp", "cnn", "transformer")

#: ``mnet train``'s defaults per model (epochs, batch size, learning rate), where the options are not given: the
#: MLP's reach 98% on the digits in seconds, the CNN's are those of experiments/cnn_digits.py, the transformer's
#: those of experiments/transformer_sequence.py (without its cosine schedule). A user's network gets the MLP's.
TRAINING_DEFAULTS = {"mlp": (40, 32, 1e-3), "cnn": (20, 32, 1e-3), "transformer": (12, 64, 3e-3)}


def _shape(text: str) -> tuple[int, ...]:
    """``8,8,1`` -> ``(8, 8, 1)``: one example's shape, without the batch axis."""
    return tuple(_widths(text))


def load_object(spec: str):
    """The object named ``MODULE:ATTR`` (``ATTR`` may be dotted), importing ``MODULE`` with the current directory on
    the path, as ``python -m`` has it. A missing module or attribute is a :class:`UsageError`."""
    import importlib
    import os

    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise UsageError(
            f"--model {spec!r}: expected one of {', '.join(BUILT_IN_MODELS)} or MODULE:ATTR (e.g. my_models:net)"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target = importlib.import_module(module_name)
    except Exception as error:  # a user's module may fail in any way while importing
        raise UsageError(
            f"--model {spec!r}: cannot import module {module_name!r} ({type(error).__name__}: {error})"
        ) from None
    for name in attribute.split("."):
        if not hasattr(target, name):
            raise UsageError(f"--model {spec!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, name)
    return target


def user_network(spec: str):
    """``MODULE:ATTR`` naming a layer, or a function of no arguments that returns one."""
    from mnet.layers.base import is_layer

    candidate = load_object(spec)
    if not is_layer(candidate) and callable(candidate):
        try:
            candidate = candidate()
        except TypeError as error:
            raise UsageError(f"--model {spec!r}: calling it with no arguments failed ({error})") from None
    if not is_layer(candidate):
        raise UsageError(
            f"--model {spec!r} is {type(candidate).__name__} {candidate!r:.80}, not a layer "
            "(an object with init, forward and backward, or a function of no arguments returning one)"
        )
    return candidate


def check_problem(args: argparse.Namespace):
    """``(net, example_shape, description)`` for ``mnet check``: an MLP from ``--layers``, a built-in model, or a
    user's network with ``--input-shape``."""
    import mnet

    if args.model is None or args.model == "mlp":
        if len(args.layers) < 2:
            raise UsageError("--layers needs the input width and at least one layer width, e.g. 64,128,10")
        return mnet.mlp(args.layers[1:], args.activation), (args.layers[0],), f"input width {args.layers[0]}"
    if args.model == "cnn":
        return mnet.models.digits_cnn(), args.input_shape or (64,), "the digits CNN"
    if args.model == "transformer":
        return mnet.models.transformer_classifier(16, 16), args.input_shape or (9,), "the transformer classifier"
    if args.input_shape is None:
        raise UsageError(f"--model {args.model}: give one example's shape with --input-shape, e.g. 8,8,1")
    return user_network(args.model), args.input_shape, f"{args.model}"


def random_targets(loss, outputs, key):
    """Targets that ``loss`` accepts for ``outputs`` (an array or its ShapeDtypeStruct)."""
    import jax

    import mnet

    if loss is mnet.losses.softmax_cross_entropy:
        if len(outputs.shape) != 2 or outputs.shape[1] < 2:
            raise UsageError(
                f"softmax_cross_entropy needs outputs of shape (batch, classes) with at least 2 output "
                f"classes, the network gives {tuple(outputs.shape)}"
            )
        return jax.random.randint(key, outputs.shape[:1], 0, outputs.shape[1])
    if loss is mnet.losses.sigmoid_binary_cross_entropy:
        return jax.random.uniform(key, outputs.shape, outputs.dtype)
    return jax.random.normal(key, outputs.shape, outputs.dtype)


def run_check(args: argparse.Namespace) -> int:
    _set_dtype(args.dtype)
    import jax
    import jax.numpy as jnp

    import mnet

    loss = mnet.losses.get(args.loss)
    net, example_shape, source = check_problem(args)
    dtype = jnp.dtype(args.dtype)
    k_init, k_x, k_t = jax.random.split(jax.random.key(args.seed), 3)
    _, params = mnet.layers.init_layer(net, k_init, example_shape, dtype)
    vocab = getattr(net, "input_vocab", None)
    x = (
        jax.random.randint(k_x, (args.batch, *example_shape), 0, vocab)
        if vocab is not None
        else jax.random.normal(k_x, (args.batch, *example_shape), dtype)
    )
    targets = random_targets(loss, jax.eval_shape(lambda p, inputs: net.forward(p, inputs)[0], params, x), k_t)
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
            print(_format_cost(result["cost"]))
    return 0 if report.ok else EXIT_DISAGREE


OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "kfac")
KFAC_LEARNING_RATE = 0.05  # the default step along K-FAC's natural-gradient direction (mnet.kfac's)


def make_optimizer(name: str, lr: float, net=None, loss=None, dataset=None):
    """The optimizer ``--optimizer`` names; K-FAC needs the network, the loss and the examples' shape and dtype."""
    import numpy as np
    import optax

    import mnet

    def kfac():
        integer = np.issubdtype(np.asarray(dataset.x_train).dtype, np.integer)
        return mnet.kfac(net, loss, dataset.example_shape, learning_rate=lr, input_dtype="int32" if integer else None)

    return {
        "sgd": lambda: optax.sgd(lr),
        "momentum": lambda: optax.sgd(lr, momentum=0.9, nesterov=True),
        "adam": lambda: optax.adam(lr),
        "adamw": lambda: optax.adamw(lr, weight_decay=1e-4),
        "kfac": kfac,
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


def training_problem(args: argparse.Namespace):
    """``(dataset, net)`` for ``mnet train``: the data (the digits, the odd-one-out sequences for the transformer,
    or ``--data``) and the network ``--model`` names."""
    import numpy as np

    import mnet
    from mnet import data

    if args.model == "transformer" and args.data is None:
        dataset = data.load_odd_one_out(args.seed)
    else:
        dataset = data.load(args.data, seed=args.seed, label_column=args.label_column)
    if args.batch_size > len(dataset.x_train):
        raise UsageError(f"--batch-size {args.batch_size} exceeds the {len(dataset.x_train)} training examples")
    classes = dataset.num_classes
    if args.model == "mlp":
        layers = ([mnet.Flatten()] if len(dataset.example_shape) > 1 else []) + list(
            mnet.mlp(args.layers + [classes], args.activation, args.compute_dtype).layers
        )
        net = mnet.serial(*layers)
    elif args.model == "cnn":
        net = mnet.models.digits_cnn(classes)
    elif args.model == "transformer":
        ids = np.asarray(dataset.x_train)
        if not np.issubdtype(ids.dtype, np.integer):
            raise UsageError("--model transformer needs token ids: a .npz whose x holds integers (see the README)")
        net = mnet.models.transformer_classifier(int(ids.max()) + 1, classes)
    else:
        net = user_network(args.model)
    return dataset, net


def gradient_check(net, loss, params, dataset, batch: int, say) -> float:
    """The hand-derived gradient against ``jax.grad`` on the first training batch; refuses to train if they
    disagree. Returns the largest relative error."""
    import jax.numpy as jnp

    import mnet

    report = mnet.compare_gradients(
        net,
        loss,
        params,
        jnp.asarray(dataset.x_train[:batch]),
        jnp.asarray(dataset.y_train[:batch]),
        layer_by_layer=False,
    )
    worst = max((row.autodiff.max_rel_error for row in report.rows), default=0.0)
    tolerance = report.rows[0].autodiff.tolerance if report.rows else 0.0
    say(
        f"gradient check on one batch of {batch}: hand-derived vs jax.grad, largest relative error "
        f"{worst:.2e} over {len(report.rows)} leaves (tolerance {tolerance:.1e}): "
        + ("agree" if report.ok else "DISAGREE")
    )
    if not report.ok:
        print(report, file=sys.stderr)
        raise UsageError("hand-derived gradients disagree with jax.grad; not training")
    return worst


class EpochReporter:
    """Shows each epoch: a tqdm bar on a terminal, else one line per epoch through ``say``."""

    def __init__(self, epochs: int, say, quiet_bar: bool):
        self.epochs, self.say, self.bar = epochs, say, None
        if sys.stderr.isatty() and not quiet_bar:
            import shutil

            from tqdm import tqdm

            # A terminal that reports a 0 x 0 size (some pseudo-terminals do) makes tqdm hide its bar; shutil falls
            # back to 80 x 24 there.
            columns, rows = shutil.get_terminal_size()
            self.bar = tqdm(total=epochs, unit="epoch", file=sys.stderr, ncols=columns, nrows=rows)

    def __call__(self, epoch: int, record: dict) -> None:
        if self.bar is not None:
            self.bar.n = epoch
            self.bar.set_postfix(loss=f"{record['train_loss']:.4f}", test_acc=f"{record['test_accuracy']:.4f}")
        else:
            self.say(
                f"epoch {epoch}/{self.epochs}  train loss {record['train_loss']:.4f}  train acc "
                f"{record['train_accuracy']:.4f}  test loss {record['test_loss']:.4f}  test acc "
                f"{record['test_accuracy']:.4f}"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def training_summary(args: argparse.Namespace, history, worst: float, say) -> dict:
    """The run's last epoch as the summary ``--json`` prints (or one line without it)."""
    final = history.last()
    if not final:
        say(f"nothing to do: the checkpoint already holds {args.epochs} epochs")
    summary = {
        "test_accuracy": final.get("test_accuracy"),
        "train_loss": final.get("train_loss"),
        "test_loss": final.get("test_loss"),
        "train_accuracy": final.get("train_accuracy"),
        "epochs": args.epochs,
        "grad": args.grad,
        "model": args.model,
        "gradient_check_max_rel_error": worst,
        "seconds": sum(history.seconds),
    }
    if args.json:
        print(json.dumps(summary))
    elif final:
        print(
            f"done: test accuracy {summary['test_accuracy']:.4f}, train loss {summary['train_loss']:.4f}, "
            f"{summary['seconds']:.2f}s of training"
        )
    return summary


def run_train(args: argparse.Namespace) -> int:
    from mnet import distributed

    # Before any JAX computation: with several processes, jax.devices() then lists every process's devices.
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    import jax

    import mnet
    from mnet import sharding, train

    if args.resume and not args.checkpoint:
        raise UsageError("--resume needs --checkpoint PATH")
    epochs, batch_size, lr = TRAINING_DEFAULTS.get(args.model, TRAINING_DEFAULTS["mlp"])
    args.epochs = args.epochs or epochs
    args.batch_size = args.batch_size or batch_size
    args.lr = args.lr or (KFAC_LEARNING_RATE if args.optimizer == "kfac" else lr)
    dataset, net = training_problem(args)
    loss = mnet.losses.softmax_cross_entropy
    output_shape, params = mnet.layers.init_layer(net, jax.random.key(args.seed), dataset.example_shape)
    if tuple(output_shape) != (dataset.num_classes,):
        raise UsageError(
            f"--model {args.model}: the network maps examples of shape {dataset.example_shape} to "
            f"{tuple(output_shape)}, but {dataset.name} has {dataset.num_classes} classes; its output must be "
            f"({dataset.num_classes},)"
        )
    leader = distributed.is_leader()
    say = (lambda text: None) if not leader else (lambda text: print(text, file=sys.stderr)) if args.json else print
    say(f"{dataset}")
    say(f"network {net!r}, {args.optimizer} lr {args.lr}, batch {args.batch_size}, {args.grad} gradients")
    worst = gradient_check(net, loss, params, dataset, min(args.batch_size, len(dataset.x_train)), say)

    config = {
        "data": str(args.data),
        "model": args.model,
        "layers": args.layers,
        "activation": args.activation,
        "compute_dtype": args.compute_dtype,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "grad": args.grad,
    }
    reporter = EpochReporter(args.epochs, say, quiet_bar=args.json)
    try:
        result = train.fit(
            net,
            loss,
            params,
            dataset,
            optimizer=make_optimizer(args.optimizer, args.lr, net, loss, dataset),
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            grad=args.grad,
            checkpoint_path=args.checkpoint,
            resume=args.resume,
            config=config,
            on_epoch=reporter,
            devices=args.devices,
            layout=args.layout,
            model_devices=args.model_devices,
        )
    finally:
        reporter.close()
    final = sharding.to_host(result.params)  # whole on every process, even where they were sharded across them
    # The last collective before the summary: gloo's own lines about new connections come before it on stdout.
    distributed.barrier("mnet train done")
    if leader:
        if args.plot:
            train.plot_history(result.history, args.plot, f"{dataset.name}: {net!r}")
        if args.save_params:
            mnet.save_params(args.save_params, final)
        training_summary(args, result.history, worst, say)
    return 0


def run_launch(args: argparse.Namespace) -> int:
    from mnet import distributed

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return distributed.launch(args.processes, command, local_devices=args.local_devices, grace_seconds=args.grace)


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


def build_parser() -> argparse.ArgumentParser:
    from mnet import losses
    from mnet.layers.elementwise import ACTIVATIONS_BY_NAME

    parser = _Parser(prog="mnet", description="Hand-derived neural network gradients, checked against jax.grad.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    check = commands.add_parser("check", help="compare hand-derived and autodiff gradients of any network")
    check.add_argument(
        "--layers",
        type=_widths,
        default=[64, 128, 64, 10],
        help="for the MLP: input width then layer widths (default 64,128,64,10)",
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
        type=_shape,
        default=None,
        metavar="D1,D2,...",
        help="one example's shape for --model MODULE:ATTR, e.g. 8,8,1",
    )
    check.add_argument("--activation", choices=sorted(ACTIVATIONS_BY_NAME), default="relu")
    check.add_argument("--loss", choices=sorted(losses.BY_NAME), default="softmax_cross_entropy")
    check.add_argument("--batch", type=_positive_int, default=32)
    check.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument(
        "--finite-differences", action="store_true", help="also compare with float64 central differences"
    )
    check.add_argument("--cost", action="store_true", help="also compare XLA cost analysis and time")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(run=run_check)

    train = commands.add_parser("train", help="train a classifier (default: an MLP on the bundled digits)")
    train.add_argument(
        "--model",
        default="mlp",
        metavar="NAME|MODULE:ATTR",
        help="mlp (default; --layers, --activation), cnn (the digits CNN), transformer (the "
        "odd-one-out sequence task by default), or a user's network MODULE:ATTR",
    )
    train.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help=".npz (x, y[, x_test, y_test]; integer x = token ids), .csv, or MNIST-style IDX "
        "file/directory; default digits (odd-one-out sequences for --model transformer)",
    )
    train.add_argument("--label-column", default=None, help="CSV label column (name or 0-based index)")
    train.add_argument(
        "--layers",
        type=_hidden_widths,
        default=[256],
        help="hidden widths, e.g. 256,128 (the output width is the number of classes; default 256)",
    )
    train.add_argument("--activation", choices=sorted(ACTIVATIONS_BY_NAME), default="relu")
    train.add_argument(
        "--epochs", type=_positive_int, default=None, help="default: 40 (mlp), 20 (cnn), 12 (transformer)"
    )
    train.add_argument("--batch-size", type=_positive_int, default=None, help="default: 32 (64 for the transformer)")
    train.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    train.add_argument("--lr", type=_positive_float, default=None, help="default: 1e-3 (3e-3 for the transformer)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--grad", choices=["manual", "autodiff"], default="manual")
    train.add_argument("--checkpoint", default=None, metavar="PATH", help="training checkpoint, written every epoch")
    train.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    train.add_argument("--save-params", default=None, metavar="PATH", help="write the final parameters here")
    train.add_argument("--plot", default=None, metavar="PATH", help="loss and accuracy curves (PNG)")
    train.add_argument(
        "--compute-dtype",
        choices=["bfloat16", "float16"],
        default=None,
        help="mixed precision: products in this dtype, float32 parameters and accumulation",
    )
    train.add_argument(
        "--devices",
        type=int,
        default=None,
        metavar="N",
        help="data-parallel over N devices (0: all available); default: one device",
    )
    train.add_argument(
        "--layout",
        choices=["replicated", "fsdp", "tensor"],
        default="replicated",
        help="where parameters and optimizer state live on the --devices: all on each, split (fully sharded), or "
        "paired dense layers split column- then row-wise (tensor parallel)",
    )
    train.add_argument(
        "--model-devices", type=_positive_int, default=None, metavar="K", help="tensor-parallel group size"
    )
    train.add_argument(
        "--coordinator", default=None, metavar="HOST:PORT", help="process 0's address (several processes)"
    )
    train.add_argument("--num-processes", type=_positive_int, default=None, metavar="N")
    train.add_argument("--process-id", type=int, default=None, metavar="I")
    train.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    train.set_defaults(run=run_train)

    launch = commands.add_parser(
        "launch", help="run a command as N processes joined into one group on this machine (mnet launch -n 2 -- train)"
    )
    launch.add_argument("-n", "--processes", type=_positive_int, required=True, metavar="N")
    launch.add_argument(
        "--local-devices", type=_positive_int, default=None, metavar="K", help="give each process K CPU devices"
    )
    launch.add_argument(
        "--grace", type=float, default=30.0, metavar="SECONDS", help="after one process fails, kill the rest after this"
    )
    launch.add_argument("command", nargs=argparse.REMAINDER, help="an mnet subcommand (train ...) or any command")
    launch.set_defaults(run=run_launch)

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
