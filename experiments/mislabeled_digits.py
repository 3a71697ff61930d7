"""Finding mislabeled training digits by self-influence: 10% of the bundled digits' training labels are flipped, an
MLP is trained on them, and the training examples are ranked by their self-influence ``g_n^T (C + damping I)^-1 g_n``
under each preconditioner (EK-FAC, K-FAC, the GGN's diagonal, the identity, and the exact GGN: the network is small
enough) and, for comparison, by their training loss.

    python experiments/mislabeled_digits.py [--epochs 60] [--seed 0] [--out experiments/out] [--quick]

Reports each ranking's detection AUC (the probability that a flipped example ranks above a clean one) and the
fraction of the flipped labels found when inspecting the top 5, 10 and 20% of the training set, and plots found
against inspected. A second figure shows, for a few test digits, the most helpful and the most harmful training
images by EK-FAC influence with their (possibly flipped) labels. The figures are honest either way: a ranking that
does no better than the loss is reported as such. ``--quick`` trains briefly on fewer examples, for the tests.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mnet

LOSS = mnet.losses.softmax_cross_entropy
PRECONDITIONERS = ("ekfac", "kfac", "diag", "identity", "ggn")
INSPECTED = (0.05, 0.10, 0.20)


def flip_labels(
    y: np.ndarray, fraction: float, classes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``fraction`` of the labels moved to another class, uniformly; returns the new labels and which were flipped."""
    flipped = np.zeros(len(y), bool)
    flipped[rng.choice(len(y), int(round(fraction * len(y))), replace=False)] = True
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, classes, flipped.sum())) % classes
    return noisy, flipped


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """The Mann-Whitney AUC: the chance that a positive example outranks a negative one (ties count half)."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # average ranks, 1-based
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def found_curve(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Fraction of the positives among the top ``k`` for every ``k`` (highest score first)."""
    return np.cumsum(positive[np.argsort(-scores, kind="stable")]) / positive.sum()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=Path("experiments/out"))
    parser.add_argument("--quick", action="store_true", help="200 examples, 3 epochs: a smoke test")
    args = parser.parse_args(argv)

    data = mnet.data.load_digits(args.seed)
    rng = np.random.default_rng(args.seed)
    count = 200 if args.quick else len(data.y_train)
    x, clean = data.x_train[:count], data.y_train[:count]
    y, flipped = flip_labels(clean, args.fraction, data.num_classes, rng)
    noisy = mnet.data.Dataset(x, y, data.x_test, data.y_test, data.num_classes, "digits, labels flipped")
    net = mnet.mlp([64, 64, 10])
    _, params = net.init(jax.random.key(args.seed), data.example_shape, jnp.float32)
    epochs = 3 if args.quick else args.epochs
    params = mnet.fit(
        net, LOSS, params, noisy, optimizer=optax.adam(1e-3), epochs=epochs, batch_size=32, seed=args.seed
    ).params
    xs, ys = jnp.asarray(x), jnp.asarray(y)
    train_accuracy = float(jnp.mean(jnp.argmax(net.apply(params, xs), axis=1) == ys))

    rankings, seconds, models = {}, {}, {}
    losses = np.asarray(LOSS.per_example(net.apply(params, xs), ys))
    rankings["training loss"] = losses
    for name in PRECONDITIONERS:
        start = time.perf_counter()
        models[name] = mnet.influence(net, LOSS, params, xs, ys, preconditioner=name, batch_size=256)
        rankings[name] = np.asarray(models[name].self_influence())
        seconds[name] = time.perf_counter() - start

    results = {
        "train_accuracy": train_accuracy,
        "flipped": int(flipped.sum()),
        "n": count,
        "epochs": epochs,
        "rankings": {},
    }
    print(
        f"MLP 64-64-10, {epochs} epochs (Adam) on {count} digits with {flipped.sum()} labels flipped "
        f"({args.fraction:.0%}); accuracy on the noisy training labels {train_accuracy:.3f}"
    )
    print(
        f"{'ranking by':>16} {'AUC':>6} "
        + " ".join(f"{'top ' + format(f, '.0%'):>8}" for f in INSPECTED)
        + f" {'damping':>9} {'seconds':>8}"
    )
    for name, scores in rankings.items():
        curve = found_curve(scores, flipped)
        found = [float(curve[max(int(round(f * count)) - 1, 0)]) for f in INSPECTED]
        results["rankings"][name] = {"auc": auc(scores, flipped), "found": found, "curve": curve}
        damping = f"{models[name].damping:9.3g}" if name in models else f"{'-':>9}"
        took = f"{seconds[name]:8.1f}" if name in seconds else f"{'-':>8}"
        print(
            f"{name:>16} {results['rankings'][name]['auc']:6.3f} "
            + " ".join(f"{v:8.3f}" for v in found)
            + f" {damping} {took}"
        )

    queries = np.arange(4)
    top = models["ekfac"].top_k(jnp.asarray(data.x_test[queries]), jnp.asarray(data.y_test[queries]), 4)
    results["top"] = top
    plot_found(results, args.out / "mislabeled_digits.png")
    plot_examples(data, x, y, flipped, queries, top, args.out / "influential_digits.png")
    return results


def plot_found(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    n = results["n"]
    inspected = np.arange(1, n + 1) / n
    for name, r in results["rankings"].items():
        axis.plot(
            inspected,
            r["curve"],
            label=f"{name} (AUC {r['auc']:.3f})",
            lw=1.5,
            ls="--" if name == "training loss" else "-",
        )
    axis.plot([0, 1], [0, 1], color="grey", lw=1, ls=":", label="random order")
    share = results["flipped"] / n
    axis.plot([0, share, 1], [0, 1, 1], color="black", lw=0.8, ls=":", label="perfect")
    axis.set(
        xlabel="fraction of the training set inspected (highest self-influence first)",
        ylabel="fraction of flipped labels found",
        xlim=(0, 0.5),
        ylim=(0, 1.02),
        title=f"{results['flipped']} flipped labels among {n} digits",
    )
    axis.legend(fontsize=8, loc="lower right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_examples(data, x, y, flipped, queries, top, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = top.helpful.shape[1]
    mean, std = data.standardisation  # the loader's standardisation undone: the digits as they were drawn

    def image(features):
        return (np.asarray(features) * std + mean).reshape(8, 8)

    figure, axes = plt.subplots(len(queries), 1 + 2 * k, figsize=(1.3 * (1 + 2 * k), 1.5 * len(queries)))
    for row, q in enumerate(queries):
        axes[row, 0].imshow(image(data.x_test[q]), cmap="gray_r")
        axes[row, 0].set_title(f"test: {data.y_test[q]}", fontsize=8)
        for column, (index, kind) in enumerate(
            [(i, "+") for i in top.helpful[row]] + [(i, "-") for i in top.harmful[row]]
        ):
            axis = axes[row, 1 + column]
            axis.imshow(image(x[int(index)]), cmap="gray_r")
            mark = " (flipped)" if flipped[int(index)] else ""
            axis.set_title(f"{kind} label {y[int(index)]}{mark}", fontsize=7, color="red" if mark else "black")
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(
        f"EK-FAC: each test digit's {k} most helpful (+) and {k} most harmful (-) training digits", fontsize=9
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
