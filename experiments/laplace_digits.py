"""Calibration by the Laplace approximation on the bundled digits: the MAP network against diagonal and Kronecker
Laplace (linearised predictive, probit), on the test split and on out-of-distribution inputs.

    python experiments/laplace_digits.py [--epochs 40] [--seed 0] [--out experiments/out] [--quick]

An MLP 64-64-10 (ReLU) is trained with AdamW on the training split less 300 examples held out for validation;
``mnet.laplace`` is fitted around the result on those training examples (exact GGN, by hand), its prior precision
chosen either by maximising the marginal likelihood ("evidence") or by the predictive's negative log-likelihood on
the held-out examples ("validation"). On the
test split: accuracy, negative log-likelihood and expected calibration error (15 equal-width confidence bins),
and a reliability diagram. Out of distribution: the mean predictive entropy on noise images (pixels uniform on the
digits' 0..16 range) and on the test digits rotated by 90 degrees, both standardised with the training statistics
exactly as the digits are. Prints a table and writes ``laplace_digits.png``; ``--quick`` trains briefly, for the
tests.
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
BINS = 15


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """``sum_bins (n_bin / n) |accuracy_bin - confidence_bin|`` over equal-width bins of the top probability."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(total)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: mean confidence, accuracy and count (bins without examples are NaN)."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    index = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore"):
        mean_conf = np.bincount(index, confidence, bins) / counts
        accuracy = np.bincount(index, correct.astype(float), bins) / counts
    return mean_conf, accuracy, counts


def entropy(probs: np.ndarray) -> np.ndarray:
    return -np.sum(probs * np.log(np.clip(probs, 1e-30, None)), axis=1)


def out_of_distribution(seed: int, count: int) -> dict[str, np.ndarray]:
    """Noise images and rotated test digits, standardised with the training split's statistics (as the dataset)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x_train, _, x_test, _ = mnet.data.split(bunch.data, bunch.target, seed)
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 17, size=(count, 64)).astype(np.float64)
    rotated = np.rot90(x_test[:count].reshape(-1, 8, 8), k=1, axes=(1, 2)).reshape(-1, 64)
    return {name: mnet.data.standardise(x_train, raw)[1] for name, raw in (("noise", noise), ("rotated 90°", rotated))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("experiments/out"))
    parser.add_argument("--quick", action="store_true", help="3 epochs of training: a smoke test")
    args = parser.parse_args(argv)

    full = mnet.data.load_digits(args.seed)
    held_out = 300
    data = mnet.data.Dataset(full.x_train[held_out:], full.y_train[held_out:], full.x_test, full.y_test,
                             full.num_classes, "digits less validation")
    x_val, y_val = jnp.asarray(full.x_train[:held_out]), jnp.asarray(full.y_train[:held_out])
    net = mnet.mlp([64, 64, 10])
    _, params = net.init(jax.random.key(args.seed), data.example_shape, jnp.float32)
    optimizer = optax.adamw(1e-3, weight_decay=1e-4)
    epochs = 3 if args.quick else args.epochs
    params = mnet.fit(net, LOSS, params, data, optimizer=optimizer, epochs=epochs, batch_size=32, seed=args.seed).params
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test), np.asarray(data.y_test)

    methods = {"MAP": None}
    for structure in ("diag", "kron"):
        la = mnet.laplace(net, LOSS, params, x, y, structure=structure, batch_size=len(x))
        methods[f"LA {structure}, evidence"] = la.optimize_prior_precision()
        grid = jnp.logspace(-2, 6, 9 if args.quick else 41)
        methods[f"LA {structure}, validation"] = la.optimize_prior_precision("nll", x_val=x_val, targets_val=y_val,
                                                                            grid=grid)
    ood = out_of_distribution(args.seed, len(data.x_test))

    results: dict[str, dict] = {}
    for name, la in methods.items():
        predict = (lambda inputs: jax.nn.softmax(net.apply(params, inputs))) if la is None else la.predict
        probs = np.asarray(predict(x_test), np.float64)
        results[name] = {
            "accuracy": float(np.mean(probs.argmax(axis=1) == y_test)),
            "nll": float(-np.mean(np.log(np.clip(probs[np.arange(len(y_test)), y_test], 1e-30, None)))),
            "ece": expected_calibration_error(probs, y_test),
            "entropy": {"test": float(entropy(probs).mean())}
            | {kind: float(entropy(np.asarray(predict(jnp.asarray(inputs)), np.float64)).mean()) for kind, inputs in ood.items()},
            "reliability": reliability(probs, y_test),
            "prior_precision": None if la is None else float(la.prior_precision),
            "probabilities": probs,
        }

    print(f"MLP 64-64-10 after {epochs} epochs (AdamW); digits test split ({len(y_test)} examples); "
          f"mean predictive entropy (max {np.log(10):.2f}) in distribution and out of it")
    print(f"{'method':>22} {'alpha':>8} {'accuracy':>9} {'NLL':>7} {'ECE':>7} " + " ".join(f"{'H ' + k:>14}" for k in results["MAP"]["entropy"]))
    for name, r in results.items():
        alpha = "-" if r["prior_precision"] is None else f"{r['prior_precision']:.3g}"
        entropies = " ".join(f"{v:>14.3f}" for v in r["entropy"].values())
        print(f"{name:>22} {alpha:>8} {r['accuracy']:>9.4f} {r['nll']:>7.4f} {r['ece']:>7.4f} {entropies}")
    plot(results, args.out / "laplace_digits.png")
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot([0, 1], [0, 1], color="grey", lw=1, label="perfect calibration")
    for (name, r), style in zip(results.items(), ("o-", "s--", "s-", "^:", "^-")):
        confidence, accuracy, counts = r["reliability"]
        kept = counts >= 5  # a bin of one or two examples says nothing about calibration
        left.plot(confidence[kept], accuracy[kept], style, markersize=4, label=f"{name} (ECE {r['ece']:.3f})")
    left.set(xlabel="confidence (top probability)", ylabel="accuracy", title="reliability, digits test split (bins of >= 5)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    kinds = list(results["MAP"]["entropy"])
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        right.bar(np.arange(len(kinds)) + i * width, [r["entropy"][k] for k in kinds], width, label=name)
    right.axhline(np.log(10), color="grey", lw=1, ls="--", label="uniform over 10 classes")
    right.set_xticks(np.arange(len(kinds)) + width * (len(results) - 1) / 2, kinds)
    right.set(ylabel="mean predictive entropy (nats)", title="in distribution and out of it")
    right.legend(fontsize=8)
    right.grid(alpha=0.3, axis="y")
    figure.suptitle("MAP vs Laplace (linearised predictive, probit), MLP 64-64-10 on the digits")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
