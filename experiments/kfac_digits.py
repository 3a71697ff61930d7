"""K-FAC against Adam and SGD with momentum on the bundled digits, for the MLP 64-64-10 and the digits CNN:
test accuracy against optimizer steps and against seconds of training.

    python experiments/kfac_digits.py [--epochs 20] [--cnn-epochs 10] [--seed 0] [--out experiments/out] [--quick]

All three train with hand-derived gradients through the same fused ``mnet.fit`` epoch (batch 32); K-FAC's step also
computes the batch's Kronecker factors by hand and refreshes the damped inverses every 10 steps (``mnet.kfac``
defaults: learning rate 0.05, momentum 0.5, damping 1e-2, KL clip 1e-3). Adam uses ``optax.adam(1e-3)``, SGD
``optax.sgd(0.05, momentum=0.9)``. Seconds are each epoch's wall time, the first epoch's (which includes
compilation) replaced by the median of the others, so that compile time favours no one. Prints a table and writes
``kfac_digits.png``; ``--quick`` trains the MLP for two epochs, for the tests.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mnet

LOSS = mnet.losses.softmax_cross_entropy


def optimizers(net, input_shape) -> dict[str, optax.GradientTransformation]:
    return {
        "K-FAC": mnet.kfac(net, LOSS, input_shape),
        "Adam": optax.adam(1e-3),
        "SGD + momentum": optax.sgd(0.05, momentum=0.9),
    }


def run(net, data, epochs: int, seed: int, batch: int) -> dict[str, dict[str, list[float]]]:
    """Each optimizer's test accuracy, steps and compile-free cumulative seconds at the end of every epoch."""
    _, params = net.init(jax.random.key(seed), data.example_shape, jnp.float32)
    steps_per_epoch = len(data.x_train) // batch
    results = {}
    for name, optimizer in optimizers(net, data.example_shape).items():
        history = mnet.fit(net, LOSS, params, data, optimizer=optimizer, epochs=epochs, batch_size=batch, seed=seed).history
        seconds = list(history.seconds)
        if len(seconds) > 1:
            seconds[0] = float(np.median(seconds[1:]))
        results[name] = {
            "steps": [steps_per_epoch * e for e in history.epoch],
            "seconds": list(np.cumsum(seconds)),
            "test_accuracy": list(history.test_accuracy),
        }
    return results


def plot(all_results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(all_results), 2, figsize=(10, 3.6 * len(all_results)), squeeze=False)
    for row, (model, results) in zip(axes, all_results.items()):
        for axis, x_name, x_label in zip(row, ("steps", "seconds"), ("optimizer steps", "seconds (2-core CPU)")):
            for (name, curve), style in zip(results.items(), ("o-", "s--", "^:")):
                axis.plot(curve[x_name], curve["test_accuracy"], style, label=name, markersize=3)
            axis.set(xlabel=x_label, ylabel="test accuracy", title=model)
            axis.set_ylim(max(0.0, min(min(c["test_accuracy"]) for c in results.values()) - 0.02), 1.0)
            axis.grid(alpha=0.3)
        row[0].legend()
    figure.suptitle("K-FAC vs Adam vs SGD on the digits (hand-derived gradients and curvature)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--cnn-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("experiments/out"))
    parser.add_argument("--quick", action="store_true", help="the MLP for 2 epochs: a smoke test")
    args = parser.parse_args(argv)

    data = mnet.data.load_digits(args.seed)
    models = {"MLP 64-64-10": (mnet.mlp([64, 64, 10]), 2 if args.quick else args.epochs)}
    if not args.quick:
        models["CNN (2 conv, 2 dense)"] = (mnet.models.digits_cnn(), args.cnn_epochs)
    all_results = {model: run(net, data, epochs, args.seed, args.batch) for model, (net, epochs) in models.items()}

    for model, results in all_results.items():
        print(f"{model}: test accuracy after each epoch (cumulative seconds in brackets)")
        for name, curve in results.items():
            cells = " ".join(f"{a:.3f}({s:.1f})" for a, s in zip(curve["test_accuracy"], curve["seconds"]))
            print(f"  {name:>15}: {cells}")
    plot(all_results, args.out / "kfac_digits.png")
    return all_results


if __name__ == "__main__":
    main()
