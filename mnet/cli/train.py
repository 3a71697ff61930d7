"""``mnet train``: a classifier on the bundled digits, a dataset file, or a user's network, with hand-derived or autodiff
gradients, checkpoints, several devices and several processes."""

from __future__ import annotations

import argparse
import json
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import mnet
from mnet import training
from mnet.cli.common import UsageError, hidden_widths, positive_float, positive_int, user_network
from mnet.core.protocol import init_layer
from mnet.layers.elementwise import ACTIVATIONS_BY_NAME
from mnet.training import data, distributed, plots, sharding, text

#: ``mnet train``'s defaults per model (epochs, batch size, learning rate), where the options are not given: the
#: MLP's reach 98% on the digits in seconds, the CNN's are those of experiments/cnn_digits.py, the transformer's
#: those of experiments/transformer_sequence.py (without its cosine schedule). A user's network gets the MLP's.
TRAINING_DEFAULTS = {"mlp": (40, 32, 1e-3), "cnn": (20, 32, 1e-3), "transformer": (12, 64, 3e-3), "gpt": (3, 32, 3e-3)}

#: ``--model gpt``: a LLaMA-style decoder small enough for a laptop's CPU (``mnet.models.gpt``'s other defaults).
GPT_D_MODEL, GPT_LAYERS, GPT_HEADS, GPT_KV_HEADS = 64, 2, 4, 2

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "kfac")

KFAC_LEARNING_RATE = 0.05  # the default step along K-FAC's natural-gradient direction (mnet.kfac's)


def make_optimizer(name: str, lr: float, net=None, loss=None, dataset=None):
    """The optimizer ``--optimizer`` names; K-FAC needs the network, the loss and the examples' shape and dtype."""

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


def training_problem(args: argparse.Namespace):
    """``(dataset, net)`` for ``mnet train``: the data (the digits, the odd-one-out sequences for the transformer,
    or ``--data``) and the network ``--model`` names."""

    if args.model == "transformer" and args.data is None:
        dataset = data.load_odd_one_out(args.seed)
    elif args.model == "gpt" and args.data is None:
        dataset = text.load_stdlib_text(args.context)
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
    elif args.model == "gpt":
        if dataset.y_train.ndim != 2 or not np.issubdtype(np.asarray(dataset.x_train).dtype, np.integer):
            raise UsageError(
                "--model gpt needs token ids and next-token labels of shape (n, T): a .npz with integer x and y "
                "of one shape, or no --data for the standard library's source"
            )
        context = dataset.x_train.shape[1]
        net = mnet.models.gpt(
            classes, context, GPT_D_MODEL, GPT_LAYERS, GPT_HEADS, num_kv_heads=GPT_KV_HEADS, block_size=min(64, context)
        )
    else:
        net = user_network(args.model)
    return dataset, net


def gradient_check(net, loss, params, dataset, batch: int, say) -> float:
    """The hand-derived gradient against ``jax.grad`` on the first training batch; refuses to train if they
    disagree. Returns the largest relative error."""

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
    if args.model == "gpt" and final:
        summary["test_bits_per_character"] = text.bits_per_character(final["test_loss"])
        summary["train_bits_per_character"] = text.bits_per_character(final["train_loss"])
    if args.json:
        print(json.dumps(summary))
    elif final:
        bits = (
            f", {summary['test_bits_per_character']:.3f} bits per character on held-out text"
            if "test_bits_per_character" in summary
            else ""
        )
        print(
            f"done: test accuracy {summary['test_accuracy']:.4f}, train loss {summary['train_loss']:.4f}{bits}, "
            f"{summary['seconds']:.2f}s of training"
        )
    return summary


def run_config(args: argparse.Namespace) -> dict:
    """What a checkpoint records of the run; resuming refuses a different one."""
    names = ("model", "layers", "activation", "compute_dtype", "optimizer", "lr", "grad")
    return {"data": str(args.data), **{name: getattr(args, name) for name in names}}


def run_train(args: argparse.Namespace) -> int:

    # Before any JAX computation: with several processes, jax.devices() then lists every process's devices.
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    if args.resume and not args.checkpoint:
        raise UsageError("--resume needs --checkpoint PATH")
    epochs, batch_size, lr = TRAINING_DEFAULTS.get(args.model, TRAINING_DEFAULTS["mlp"])
    args.epochs = args.epochs or epochs
    args.batch_size = args.batch_size or batch_size
    args.lr = args.lr or (KFAC_LEARNING_RATE if args.optimizer == "kfac" else lr)
    dataset, net = training_problem(args)
    loss = mnet.losses.softmax_cross_entropy
    output_shape, params = init_layer(net, jax.random.key(args.seed), dataset.example_shape)
    expected = tuple(np.shape(dataset.y_train)[1:]) + (dataset.num_classes,)  # a logit per class (and position)
    if tuple(output_shape) != expected:
        raise UsageError(
            f"--model {args.model}: the network maps examples of shape {dataset.example_shape} to "
            f"{tuple(output_shape)}, but {dataset.name} has {dataset.num_classes} classes; its output must be "
            f"{expected}"
        )
    leader = distributed.is_leader()
    say = (lambda text: None) if not leader else (lambda text: print(text, file=sys.stderr)) if args.json else print
    say(f"{dataset}")
    say(f"network {net!r}, {args.optimizer} lr {args.lr}, batch {args.batch_size}, {args.grad} gradients")
    worst = gradient_check(net, loss, params, dataset, min(args.batch_size, len(dataset.x_train)), say)

    reporter = EpochReporter(args.epochs, say, quiet_bar=args.json)
    try:
        result = training.fit(
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
            config=run_config(args),
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
            plots.plot_history(result.history, args.plot, f"{dataset.name}: {net!r}")
        if args.save_params:
            mnet.save_params(args.save_params, final)
        training_summary(args, result.history, worst, say)
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``mnet train`` and its options."""
    train = commands.add_parser("train", help="train a classifier (default: an MLP on the bundled digits)")
    train.add_argument(
        "--model",
        default="mlp",
        metavar="NAME|MODULE:ATTR",
        help="mlp (default; --layers, --activation), cnn (the digits CNN), transformer (the "
        "odd-one-out sequence task by default), gpt (a LLaMA-style decoder; by default next-character prediction on "
        "the standard library's source, reported in bits per character), or a user's network MODULE:ATTR",
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
        "--context", type=positive_int, default=128, help="--model gpt on the bundled text: characters per window"
    )
    train.add_argument(
        "--layers",
        type=hidden_widths,
        default=[256],
        help="hidden widths, e.g. 256,128 (the output width is the number of classes; default 256)",
    )
    train.add_argument("--activation", choices=sorted(ACTIVATIONS_BY_NAME), default="relu")
    train.add_argument(
        "--epochs", type=positive_int, default=None, help="default: 40 (mlp), 20 (cnn), 12 (transformer), 3 (gpt)"
    )
    train.add_argument("--batch-size", type=positive_int, default=None, help="default: 32 (64 for the transformer)")
    train.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    train.add_argument("--lr", type=positive_float, default=None, help="default: 1e-3 (3e-3 for the transformer)")
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
    add_scale_options(train)
    train.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    train.set_defaults(run=run_train)


def add_scale_options(train: argparse.ArgumentParser) -> None:
    """Several devices and several processes."""
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
        "--model-devices", type=positive_int, default=None, metavar="K", help="tensor-parallel group size"
    )
    train.add_argument(
        "--coordinator", default=None, metavar="HOST:PORT", help="process 0's address (several processes)"
    )
    train.add_argument("--num-processes", type=positive_int, default=None, metavar="N")
    train.add_argument("--process-id", type=int, default=None, metavar="I")
