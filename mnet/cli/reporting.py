"""What ``mnet train`` prints: the gradient check's verdict, each epoch, the summary (with the privacy spent)."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys

import jax.numpy as jnp
from tqdm import tqdm

import mnet
from mnet.cli.common import UsageError
from mnet.training import text


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
    tolerance = max((row.autodiff.tolerance for row in report.rows), default=0.0)
    verdict = "agree" if report.ok else "DISAGREE"
    by_absolute = [row.path for row in report.rows if row.autodiff.ok and row.autodiff.max_rel_error > tolerance]
    if report.ok and by_absolute:
        # A leaf whose gradient is zero in exact arithmetic carries rounding noise only; it is judged against the
        # whole gradient's scale, and the line says so rather than print an error above the tolerance as "agree".
        leaves = "the leaf" if len(by_absolute) == 1 else f"the {len(by_absolute)} leaves"
        verdict = (
            f"agree ({leaves} above it, {', '.join(by_absolute[:2])}, zero in exact arithmetic, within the tolerance "
            "times the gradient's largest entry)"
        )
    say(
        f"gradient check on one batch of {batch}: hand-derived vs jax.grad, largest relative error "
        f"{worst:.2e} over {len(report.rows)} leaves (tolerance {tolerance:.1e}): {verdict}"
    )
    if not report.ok:
        print(report, file=sys.stderr)
        raise UsageError("hand-derived gradients disagree with jax.grad; not training")
    return worst


def finite_or_none(value) -> float | None:
    """A figure for the JSON summary: None where there is none (a regression's accuracy is NaN)."""
    return None if value is None or not math.isfinite(value) else float(value)


class EpochReporter:
    """Shows each epoch: a tqdm bar on a terminal, else one line per epoch through ``say``."""

    def __init__(self, epochs: int, say, quiet_bar: bool, resuming: str | None = None):
        # A resumed run says so with its first epoch: a run refused before it trains never claims to resume.
        self.epochs, self.say, self.bar, self.resuming = epochs, say, None, resuming
        if sys.stderr.isatty() and not quiet_bar:
            # A terminal that reports a 0 x 0 size (some pseudo-terminals do) makes tqdm hide its bar; shutil falls
            # back to 80 x 24 there.
            columns, rows = shutil.get_terminal_size()
            self.bar = tqdm(total=epochs, unit="epoch", file=sys.stderr, ncols=columns, nrows=rows)

    def __call__(self, epoch: int, record: dict) -> None:
        if self.resuming is not None:
            print(self.resuming, file=sys.stderr)
            self.resuming = None
        if self.bar is not None:
            self.bar.n = epoch
            self.bar.set_postfix(loss=f"{record['train_loss']:.4f}", test_acc=f"{record['test_accuracy']:.4f}")
        elif math.isnan(record["train_accuracy"]):  # a regression: no accuracy to show
            self.say(
                f"epoch {epoch}/{self.epochs}  train loss {record['train_loss']:.4g}  test loss {record['test_loss']:.4g}"
            )
        else:
            self.say(
                f"epoch {epoch}/{self.epochs}  train loss {record['train_loss']:.4f}  train acc "
                f"{record['train_accuracy']:.4f}  test loss {record['test_loss']:.4f}  test acc "
                f"{record['test_accuracy']:.4f}"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def training_summary(args: argparse.Namespace, history, worst: float, say, examples: int) -> dict:
    """The run's last epoch as the summary ``--json`` prints (or one line without it)."""
    final = history.last()
    if not final:
        say(f"nothing to do: the checkpoint already holds {args.epochs} epochs")
    summary = {
        "test_accuracy": finite_or_none(final.get("test_accuracy")),
        "train_loss": final.get("train_loss"),
        "test_loss": final.get("test_loss"),
        "train_accuracy": finite_or_none(final.get("train_accuracy")),
        "epochs": args.epochs,
        "grad": args.grad,
        "model": args.model,
        "gradient_check_max_rel_error": worst,
        "seconds": sum(history.seconds),
    }
    if args.model == "gpt" and final:
        summary["test_bits_per_character"] = text.bits_per_character(final["test_loss"])
        summary["train_bits_per_character"] = text.bits_per_character(final["train_loss"])
    if args.dp_clip is not None:
        steps = args.epochs * (examples // args.batch_size)
        delta = args.dp_delta if args.dp_delta is not None else 1 / examples**1.1
        summary["dp_epsilon"] = mnet.dp_epsilon(
            args.dp_noise, args.batch_size / examples, steps, delta, examples=examples
        )
        summary["dp_delta"] = delta
        say(
            f"privacy: ({summary['dp_epsilon']:.3g}, {delta:.3g})-DP after {steps} Poisson-sampled steps of rate "
            f"{args.batch_size / examples:.4g} (PLD accountant, truncated batches counted)"
        )
    if args.json:
        print(json.dumps(summary))
    elif final:
        bits = (
            f", {summary['test_bits_per_character']:.3f} bits per character on held-out text"
            if "test_bits_per_character" in summary
            else ""
        )
        measured = (
            f"test loss {summary['test_loss']:.4g}"
            if args.loss == "mse"
            else f"test accuracy {summary['test_accuracy']:.4f}"
        )
        print(f"done: {measured}, train loss {summary['train_loss']:.4f}{bits}, {summary['seconds']:.2f}s of training")
    return summary
