"""``mnet predict``: a training checkpoint and inputs in, predictions out (a ``.npz`` written atomically), with no
script: the network is built from the description the checkpoint carries."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mnet.cli.common import UsageError
from mnet.core.protocol import call_forward, is_stateful
from mnet.errors import DataError
from mnet.training import checkpoint
from mnet.training.trained import load_trained


def read_inputs(path: str) -> np.ndarray:
    """``.npy`` (the array), ``.npz`` (its ``x``) or ``.csv`` (numbers, one example a row; a header row is
    skipped): never unpickled."""
    source = Path(path)
    if not source.exists():
        raise DataError(f"--input {path}: no such file")
    try:
        if source.suffix == ".npy":
            return np.load(source, allow_pickle=False)
        if source.suffix == ".npz":
            with np.load(source, allow_pickle=False) as archive:
                if "x" not in archive.files:
                    raise DataError(f"--input {path}: no array x (found {', '.join(archive.files) or 'none'})")
                return archive["x"]
        if source.suffix == ".csv":
            text = source.read_text().splitlines()
            skip = 1 if text and any(c.isalpha() for c in text[0]) else 0
            return np.loadtxt(source, delimiter=",", skiprows=skip, ndmin=2)
    except DataError:
        raise
    except (ValueError, OSError, EOFError) as error:
        raise DataError(f"--input {path}: not a readable array file ({type(error).__name__})") from None
    raise DataError(f"--input {path}: unknown format; expected .npy, .npz (with x) or .csv")


def run_predict(args: argparse.Namespace) -> int:

    if Path(args.output).exists() and not args.overwrite:
        raise UsageError(f"--output {args.output} already exists: pass --overwrite to replace it")
    model = load_trained(args.checkpoint)
    x = model.prepare(read_inputs(args.input), f"--input {args.input}")
    state = model.state if is_stateful(model.net) else None
    outputs = jax.jit(lambda p, inputs, s: call_forward(model.net, p, inputs, state=s)[0])(
        model.params, jnp.asarray(x), state
    )
    predictive = np.asarray(model.loss.predictive(outputs))
    arrays = {"outputs": np.asarray(outputs), "predictive": predictive}
    if model.loss.kind == "classification":
        arrays["labels"] = np.asarray(jnp.argmax(outputs, axis=-1)).astype(np.int32)
    checkpoint.atomic_write(args.output, lambda file: np.savez(file, **arrays))  # type: ignore[arg-type]
    summary = {"output": args.output, "examples": len(x), "arrays": sorted(arrays)}
    print(
        json.dumps(summary)
        if args.json
        else f"wrote {', '.join(sorted(arrays))} for {len(x)} examples to {args.output}"
    )
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``mnet predict`` and its options."""
    command = commands.add_parser("predict", help="predict with a training checkpoint (no script needed)")
    command.add_argument("--checkpoint", required=True, metavar="PATH", help="written by mnet train --checkpoint")
    command.add_argument(
        "--input", required=True, metavar="PATH", help=".npy, .npz (array x) or .csv: raw inputs, one example a row"
    )
    command.add_argument(
        "--output", required=True, metavar="PATH", help=".npz: outputs, predictive (probabilities), labels"
    )
    command.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    command.add_argument("--json", action="store_true", help="print one JSON object")
    command.set_defaults(run=run_predict)
