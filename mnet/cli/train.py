"""``mnet train``: a classifier on the bundled digits, a dataset file, or a user's network, with hand-derived or autodiff
gradients, checkpoints, several devices and several processes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np
import optax

import mnet
from mnet import training
from mnet.cli.common import (
    UsageError,
    hidden_widths,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    user_network,
)
from mnet.cli.reporting import EpochReporter, gradient_check, training_summary
from mnet.core.protocol import init_layer
from mnet.layers.elementwise import ACTIVATIONS_BY_NAME
from mnet.training import checkpoint, data, distributed, plots, sharding, text

#: ``mnet train``'s defaults per model (epochs, batch size, learning rate), where the options are not given: the
#: MLP's reach 98% on the digits in seconds, the CNN's are those of experiments/cnn_digits.py, the transformer's
#: those of experiments/transformer_sequence.py (without its cosine schedule). A user's network gets the MLP's.
TRAINING_DEFAULTS = {"mlp": (40, 32, 1e-3), "cnn": (20, 32, 1e-3), "transformer": (12, 64, 3e-3), "gpt": (3, 32, 3e-3)}

#: ``--model gpt``: a LLaMA-style decoder small enough for a laptop's CPU (``mnet.models.gpt``'s other defaults).
GPT_D_MODEL, GPT_LAYERS, GPT_HEADS, GPT_KV_HEADS = 64, 2, 4, 2
GPT_CONTEXT = 128

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "kfac", "ekfac")

#: The second-order optimizers: a constant step along a natural-gradient direction (mnet.kfac).
NATURAL_GRADIENT = ("kfac", "ekfac")

#: ``--loss``: the names the command line knows, and the losses they are.
LOSSES = {"cross_entropy": "softmax_cross_entropy", "mse": "mse"}

KFAC_LEARNING_RATE = 0.05  # the default step along K-FAC's natural-gradient direction (mnet.kfac's)


def make_optimizer(name: str, lr, net=None, loss=None, dataset=None, weight_decay: float = 0.0):
    """The optimizer ``--optimizer`` names, at learning rate ``lr`` (a number or an optax schedule), with decoupled
    ``weight_decay`` (AdamW's for adam, added to the update for SGD); K-FAC needs the network, the loss and the
    examples' shape and dtype."""

    def decayed(optimizer):
        return optimizer if not weight_decay else optax.chain(optax.add_decayed_weights(weight_decay), optimizer)

    return {
        "sgd": lambda: decayed(optax.sgd(lr)),
        "momentum": lambda: decayed(optax.sgd(lr, momentum=0.9, nesterov=True)),
        "adam": lambda: optax.adamw(lr, weight_decay=weight_decay) if weight_decay else optax.adam(lr),
        "adamw": lambda: optax.adamw(lr, weight_decay=weight_decay or 1e-4),
        "kfac": lambda: mnet.kfac(net, loss, dataset.example_shape, learning_rate=lr),
        "ekfac": lambda: mnet.kfac(net, loss, dataset.example_shape, learning_rate=lr, eigenvalue_correction=True),
    }[name]()


def learning_rate(args: argparse.Namespace, examples: int):
    """``--lr`` as ``--schedule`` shapes it over the run's steps: constant, or a cosine decay to 0 after
    ``--warmup-epochs`` of linear warm-up from 0."""
    if args.schedule == "constant":
        return args.lr
    steps_per_epoch = examples // args.batch_size
    warmup, total = args.warmup_epochs * steps_per_epoch, args.epochs * steps_per_epoch
    return optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(total, warmup + 1), 0.0)


def load_data(
    model: str, path: str | None, seed: int, label_column: str | None, context: int, regression: bool = False
) -> data.Dataset:
    """The data ``mnet train`` trains on (and ``mnet eval`` evaluates on): ``--data``, else the model's own task
    (the odd-one-out sequences for the transformer, the standard library's source for the GPT, the digits)."""
    if model == "transformer" and path is None:
        return data.load_odd_one_out(seed)
    if model == "gpt" and path is None:
        return text.load_stdlib_text(context)
    return data.load(path, seed=seed, label_column=label_column, regression=regression)


def training_problem(args: argparse.Namespace):
    """``(dataset, net)`` for ``mnet train``: the data (the digits, the odd-one-out sequences for the transformer,
    or ``--data``) and the network ``--model`` names."""

    dataset = load_data(args.model, args.data, args.seed, args.label_column, args.context, args.loss == "mse")
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


def run_config(args: argparse.Namespace) -> dict:
    """What a checkpoint records of the run; resuming refuses a different one."""
    names = "model layers activation compute_dtype optimizer lr grad dp_clip dp_noise loss schedule warmup_epochs"
    names += " weight_decay"
    extra = {"label_column": args.label_column, "context": args.context}
    return {"data": args.data, **{name: getattr(args, name) for name in names.split()}, **extra}


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that would be ignored, or that contradict each other, in the flags' own terms."""
    if args.resume and not args.checkpoint:
        raise UsageError("--resume needs --checkpoint PATH")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: keep the checkpoint's run, or replace it")
    if args.model != "mlp":
        for flag, value in (("--layers", args.layers), ("--activation", args.activation)):
            if value is not None:
                raise UsageError(f"{flag} builds --model mlp only; --model {args.model} has its own architecture")
        if args.compute_dtype is not None:
            raise UsageError(f"--compute-dtype applies to --model mlp only, not --model {args.model}")
    if args.layout != "replicated" and args.devices is None:
        raise UsageError(f"--layout {args.layout} shards the parameters over devices: give --devices N (0: all)")
    if args.model_devices is not None and args.layout != "tensor":
        raise UsageError("--model-devices sets the tensor-parallel group: it needs --layout tensor")
    if args.context is not None and args.model != "gpt":
        raise UsageError("--context applies to --model gpt only")
    args.context = args.context or GPT_CONTEXT
    if args.optimizer in NATURAL_GRADIENT and (args.schedule != "constant" or args.weight_decay):
        raise UsageError(f"--optimizer {args.optimizer} takes a constant --lr and no --weight-decay")
    if args.warmup_epochs and args.schedule != "warmup-cosine":
        raise UsageError("--warmup-epochs applies to --schedule warmup-cosine")
    if args.loss == "mse" and args.model not in ("mlp",) and ":" not in args.model:
        raise UsageError(f"--loss mse trains --model mlp or a network of your own, not --model {args.model}")
    if args.loss == "mse" and args.data is None:
        raise UsageError("--loss mse needs --data with numeric targets (.npz or .csv); the digits are class labels")
    private = args.dp_clip is not None or args.dp_noise is not None
    if private and (args.dp_clip is None or args.dp_noise is None):
        raise UsageError("DP-SGD needs both --dp-clip C and --dp-noise SIGMA")
    if private and (args.grad != "manual" or args.optimizer in NATURAL_GRADIENT or args.devices is not None):
        raise UsageError("--dp-clip/--dp-noise train with --grad manual, a first-order --optimizer, on one device")
    if args.dp_delta is not None and not private:
        raise UsageError("--dp-delta applies to DP-SGD (--dp-clip and --dp-noise)")


def resumed_epoch(args: argparse.Namespace) -> int | None:
    """The epoch ``--resume`` continues from (None when not resuming); refuses a missing checkpoint, and one that
    exists without ``--resume`` or ``--overwrite``."""
    if not args.checkpoint:
        return None
    exists = Path(args.checkpoint).exists()
    if args.resume and not exists:
        raise UsageError(f"--resume: {args.checkpoint} does not exist (nothing to resume; drop --resume to start)")
    if exists and not (args.resume or args.overwrite):
        raise UsageError(
            f"--checkpoint {args.checkpoint} already exists: pass --resume to continue it or --overwrite to replace it"
        )
    if not args.resume:
        return None
    return int(checkpoint.read_metadata(args.checkpoint).get("epoch", 0))


def run_train(args: argparse.Namespace) -> int:

    # Before any JAX computation: with several processes, jax.devices() then lists every process's devices.
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    check_flags(args)
    epochs, batch_size, lr = TRAINING_DEFAULTS.get(args.model, TRAINING_DEFAULTS["mlp"])
    done = resumed_epoch(args)
    if done is not None and args.epochs is not None and args.epochs < done:
        raise UsageError(f"--epochs {args.epochs} is fewer than the {done} epochs {args.checkpoint} already holds")
    args.epochs = args.epochs or max(epochs, done or 0)
    args.batch_size = args.batch_size or batch_size
    args.lr = args.lr or (KFAC_LEARNING_RATE if args.optimizer in NATURAL_GRADIENT else lr)
    args.layers = [256] if args.layers is None else args.layers
    args.activation = args.activation or "relu"
    dataset, net = training_problem(args)
    loss = mnet.losses.get(LOSSES[args.loss])
    output_shape, params = init_layer(net, jax.random.key(args.seed), dataset.example_shape)
    if dataset.task == "regression":
        expected, what = tuple(np.shape(dataset.y_train)[1:]), f"{dataset.num_classes} targets"
    else:  # a logit per class (and position)
        expected, what = tuple(np.shape(dataset.y_train)[1:]) + (dataset.num_classes,), f"{dataset.num_classes} classes"
    if tuple(output_shape) != expected:
        raise UsageError(
            f"--model {args.model}: the network maps examples of shape {dataset.example_shape} to "
            f"{tuple(output_shape)}, but {dataset.name} has {what}; its output must be {expected}"
        )
    leader = distributed.is_leader()
    say = (lambda text: None) if not leader else (lambda text: print(text, file=sys.stderr)) if args.json else print
    say(f"{dataset}")
    say(f"network {net!r}, {args.optimizer} lr {args.lr}, batch {args.batch_size}, {args.grad} gradients")
    worst = gradient_check(net, loss, params, dataset, min(args.batch_size, len(dataset.x_train)), say)

    rate = learning_rate(args, len(dataset.x_train))
    optimizer, grad = make_optimizer(args.optimizer, rate, net, loss, dataset, args.weight_decay), args.grad
    if args.dp_clip is not None:
        noise = mnet.dp_noise(args.dp_clip, args.dp_noise, None, jax.random.fold_in(jax.random.key(args.seed), 7))
        optimizer, grad = optax.chain(noise, optimizer), mnet.clipped_value_and_grad(net, loss, args.dp_clip)
    resuming = (
        None if done is None or not distributed.is_leader() else f"resuming from epoch {done} of {args.checkpoint}"
    )
    reporter = EpochReporter(args.epochs, say, quiet_bar=args.json, resuming=resuming)
    try:
        result = training.fit(
            net,
            loss,
            params,
            dataset,
            optimizer=optimizer,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            grad=grad,
            sampling="shuffle" if args.dp_clip is None else "poisson",
            checkpoint_path=args.checkpoint,
            resume=args.resume,
            overwrite=args.overwrite,
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
        training_summary(args, result.history, worst, say, len(dataset.x_train))
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
        "--context",
        type=positive_int,
        default=None,
        help=f"--model gpt on the bundled text: characters per window (default {GPT_CONTEXT})",
    )
    train.add_argument(
        "--layers",
        type=hidden_widths,
        default=None,
        help="--model mlp: hidden widths, e.g. 256,128 (the output width is the number of classes; default 256)",
    )
    train.add_argument(
        "--activation", choices=sorted(ACTIVATIONS_BY_NAME), default=None, help="--model mlp (default relu)"
    )
    train.add_argument(
        "--epochs", type=positive_int, default=None, help="default: 40 (mlp), 20 (cnn), 12 (transformer), 3 (gpt)"
    )
    train.add_argument("--batch-size", type=positive_int, default=None, help="default: 32 (64 for the transformer)")
    train.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adam",
        help="first-order (optax), or K-FAC / EK-FAC natural-gradient steps (mnet.kfac; default --lr 0.05)",
    )
    train.add_argument(
        "--loss",
        choices=sorted(LOSSES),
        default="cross_entropy",
        help="cross_entropy (classification, default) or mse (regression: --data with numeric targets)",
    )
    train.add_argument(
        "--schedule",
        choices=["constant", "cosine", "warmup-cosine"],
        default="constant",
        help="the learning rate over the run: constant (default), or cosine decay to 0 (after --warmup-epochs)",
    )
    train.add_argument(
        "--warmup-epochs", type=non_negative_int, default=0, help="--schedule warmup-cosine: epochs of linear warm-up"
    )
    train.add_argument(
        "--weight-decay", type=non_negative_float, default=0.0, help="decoupled weight decay (AdamW's for adam)"
    )
    train.add_argument("--lr", type=positive_float, default=None, help="default: 1e-3 (3e-3 for the transformer)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--grad", choices=["manual", "autodiff"], default="manual")
    train.add_argument("--checkpoint", default=None, metavar="PATH", help="training checkpoint, written every epoch")
    train.add_argument("--resume", action="store_true", help="continue from --checkpoint (which must exist)")
    train.add_argument(
        "--overwrite", action="store_true", help="replace an existing --checkpoint (refused without this or --resume)"
    )
    train.add_argument("--save-params", default=None, metavar="PATH", help="write the final parameters here")
    train.add_argument("--plot", default=None, metavar="PATH", help="loss and accuracy curves (PNG)")
    train.add_argument(
        "--compute-dtype",
        choices=["bfloat16", "float16"],
        default=None,
        help="mixed precision: products in this dtype, float32 parameters and accumulation",
    )
    add_privacy_options(train)
    add_scale_options(train)
    train.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    train.set_defaults(run=run_train)


def add_privacy_options(train: argparse.ArgumentParser) -> None:
    """DP-SGD: clipped per-example gradients, Gaussian noise, Poisson-sampled batches, the privacy spent."""
    train.add_argument(
        "--dp-clip", type=positive_float, default=None, metavar="C", help="DP-SGD: clip each example's gradient to C"
    )
    train.add_argument(
        "--dp-noise", type=non_negative_float, default=None, metavar="SIGMA", help="DP-SGD: noise multiplier"
    )
    train.add_argument(
        "--dp-delta",
        type=positive_float,
        default=None,
        metavar="D",
        help="DP-SGD: the delta of the (epsilon, delta) reported (default 1/n^1.1)",
    )


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
