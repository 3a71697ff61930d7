"""``mnet eval``: a training checkpoint and data in, the loss and accuracy out, with no script: the network is built
from the description the checkpoint carries."""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np

from mnet.cli.reporting import finite_or_none
from mnet.cli.train import GPT_CONTEXT, load_data
from mnet.training import text
from mnet.training.fit import make_evaluate
from mnet.training.trained import load_trained


def run_eval(args: argparse.Namespace) -> int:

    model = load_trained(args.checkpoint)
    config = model.metadata.get("config", {})
    dataset = load_data(
        config.get("model", "mlp") if args.data is None else "mlp",
        args.data if args.data is not None else config.get("data"),
        int(config.get("seed", 0)),
        args.label_column if args.data is not None else config.get("label_column"),
        int(config.get("context") or GPT_CONTEXT),
        model.loss.kind == "regression",
    )
    split = args.split
    source = args.data or "the run's own data"
    x = model.prepare(raw_inputs(dataset, split), f"--data {source} ({split} split)")
    y = np.asarray(getattr(dataset, f"y_{split}"))
    if model.loss.kind == "classification":
        outputs = (len(y), *np.shape(y)[1:], int(model.metadata["model"]["classes"]))
        model.loss.check_targets(outputs, y, f"the {split} labels")
    loss, accuracy = make_evaluate(model.net, model.loss)(model.params, jnp.asarray(x), jnp.asarray(y), model.state)
    result = {"split": split, "examples": len(y), "loss": float(loss), "accuracy": finite_or_none(float(accuracy))}
    if config.get("model") == "gpt":
        result["bits_per_character"] = text.bits_per_character(float(loss))
    if args.json:
        print(json.dumps(result))
    else:
        bits = f", {result['bits_per_character']:.3f} bits per character" if "bits_per_character" in result else ""
        correct = "" if result["accuracy"] is None else f", accuracy {result['accuracy']:.4f}"
        print(f"{args.checkpoint}: {split} loss {result['loss']:.4g}{correct}{bits} on {len(y)} examples")
    return 0


def raw_inputs(dataset, split: str) -> np.ndarray:
    """A split's inputs in the units the data came in: the loaders standardise by their own training split, so the
    checkpoint's standardisation is applied afresh (the same numbers when the data is the training run's)."""
    x = np.asarray(getattr(dataset, f"x_{split}"))
    if dataset.standardisation is None:
        return x
    mean, std = dataset.standardisation
    return x * std + mean


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``mnet eval`` and its options."""
    command = commands.add_parser("eval", help="evaluate a training checkpoint on data (no script needed)")
    command.add_argument("--checkpoint", required=True, metavar="PATH", help="written by mnet train --checkpoint")
    command.add_argument(
        "--data", default=None, metavar="PATH", help="as for mnet train (default: the data the run trained on)"
    )
    command.add_argument("--label-column", default=None, help="CSV label column (name or 0-based index)")
    command.add_argument("--split", choices=["test", "train"], default="test")
    command.add_argument("--json", action="store_true", help="print one JSON object")
    command.set_defaults(run=run_eval)
