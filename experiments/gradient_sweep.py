"""Sweep random architectures, activations, losses and both dtypes; measure how far the hand-derived gradient
is from jax.grad, and how far both are from float64 central differences.

    python experiments/gradient_sweep.py [--networks 200] [--out experiments/out]

Writes ``gradient_sweep.md`` (summary table), ``gradient_sweep.csv`` (one row per network) and
``gradient_sweep.png`` (error distributions) into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mnet  # noqa: E402

ACTIVATIONS = ["relu", "leaky_relu", "elu", "gelu", "sigmoid", "tanh", "softplus", "identity"]
LOSSES = ["mse", "softmax_cross_entropy", "sigmoid_binary_cross_entropy"]


def random_case(rng: np.random.Generator, dtype):
    depth = int(rng.integers(0, 5))
    widths = [int(rng.choice([4, 16, 64])) for _ in range(depth)]
    activation = str(rng.choice(ACTIVATIONS))
    loss = mnet.losses.get(str(rng.choice(LOSSES)))
    out_dim = int(rng.choice([2, 5, 10]))
    in_dim, batch = int(rng.choice([3, 16, 64])), int(rng.choice([1, 8, 32]))
    net = mnet.mlp(widths + [out_dim], activation)
    _, params = net.init(jax.random.key(int(rng.integers(2**31))), (in_dim,), dtype)
    x = jnp.asarray(rng.normal(size=(batch, in_dim)), dtype)
    if loss is mnet.losses.softmax_cross_entropy:
        targets = jnp.asarray(rng.integers(0, out_dim, batch))
    elif loss is mnet.losses.sigmoid_binary_cross_entropy:
        targets = jnp.asarray(rng.uniform(size=(batch, out_dim)), dtype)
    else:
        targets = jnp.asarray(rng.normal(size=(batch, out_dim)), dtype)
    return net, loss, params, x, targets, activation, depth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", type=int, default=200, help="random networks per dtype")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("experiments/out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    rows = []
    started = time.perf_counter()
    for dtype in (jnp.float32, jnp.float64):
        for index in range(args.networks):
            net, loss, params, x, targets, activation, depth = random_case(rng, dtype)
            report = mnet.compare_gradients(net, loss, params, x, targets, finite_differences=True,
                                            layer_by_layer=False, seed=index)
            rows.append({
                "dtype": jnp.dtype(dtype).name, "network": repr(net), "activation": activation, "depth": depth,
                "loss": loss.name, "ok": report.ok,
                "hand_vs_autodiff": max(r.autodiff.max_rel_error for r in report.rows),
                "hand_vs_fd": max(r.finite_differences.max_rel_error for r in report.rows),
                "autodiff_vs_fd": max(r.autodiff_vs_finite_differences.max_rel_error for r in report.rows),
            })
    seconds = time.perf_counter() - started

    with (args.out / "gradient_sweep.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    lines = [f"{len(rows)} random networks ({args.networks} per dtype; depth 0-4, widths 4/16/64, "
             f"{len(ACTIVATIONS)} activations, {len(LOSSES)} losses), {seconds:.0f} s.", "",
             "| dtype | comparison | median | 99th percentile | max | all within tolerance |",
             "|---|---|---|---|---|---|"]
    for dtype in ("float32", "float64"):
        subset = [row for row in rows if row["dtype"] == dtype]
        for key, label in (("hand_vs_autodiff", "hand vs jax.grad"), ("hand_vs_fd", "hand vs float64 FD"),
                           ("autodiff_vs_fd", "jax.grad vs float64 FD")):
            values = np.array([row[key] for row in subset])
            lines.append(f"| {dtype} | {label} | {np.median(values):.1e} | {np.percentile(values, 99):.1e} | "
                         f"{values.max():.1e} | {sum(row['ok'] for row in subset)}/{len(subset)} |")
    (args.out / "gradient_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    bins = np.logspace(-19, 0, 77)
    for axis, dtype in zip(axes, ("float32", "float64")):
        subset = [row for row in rows if row["dtype"] == dtype]
        for key, label in (("hand_vs_autodiff", "hand vs jax.grad"), ("hand_vs_fd", "hand vs FD (float64)"),
                           ("autodiff_vs_fd", "jax.grad vs FD (float64)")):
            axis.hist(np.maximum([row[key] for row in subset], 1e-19), bins=bins, alpha=0.55, label=label)
        axis.set(xscale="log", xlabel="largest relative error over one network's leaves (exact 0 drawn at 1e-19)", title=dtype)
        axis.axvline(mnet.checking.agreement.tolerance(dtype), color="k", ls="--", lw=1, label="tolerance")
        axis.legend(fontsize=8)
    axes[0].set_ylabel("networks")
    figure.suptitle("Hand-derived gradients vs jax.grad vs finite differences, random MLPs")
    figure.tight_layout()
    figure.savefig(args.out / "gradient_sweep.png", dpi=100)


if __name__ == "__main__":
    main()
