"""Optimal Brain Damage on the digits MLP: prune weights by the saliency ``diag(H) w^2 / 2`` (LeCun, Denker and Solla
1990), by the same with the GGN diagonal, and by magnitude ``|w|``, over sparsities 0 to 95%, without retraining
and after a short retraining of the weights that remain.

    python experiments/pruning.py [--epochs 40] [--retrain-epochs 2] [--seed 0] [--out experiments/out] [--quick]

The network is an MLP 64-128-64-10 with tanh (so the Hessian's own second-derivative terms are not zero and
the two curvature saliencies differ); the diagonals are taken on the whole training set, by hand
(``mnet.diag_hessian``, ``mnet.diag_ggn``). Weights are ranked globally across layers; biases are kept.
Prints a table of test accuracies and writes ``pruning.png``. ``--quick`` runs a few sparsities on a short
training, for the tests.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mnet

CRITERIA = ("OBD, diag Hessian", "OBD, diag GGN", "magnitude")


def saliencies(net, loss, params, x, y) -> dict[str, list[jax.Array]]:
    """Each criterion's score for every weight matrix ``W`` (a low score is pruned first)."""
    hessian = jax.jit(mnet.diag_hessian(net, loss))(params, x, y)
    ggn = jax.jit(mnet.diag_ggn(net, loss))(params, x, y)
    dense = [i for i, entry in enumerate(params) if entry]
    return {
        "OBD, diag Hessian": [hessian[i]["W"] * params[i]["W"] ** 2 / 2 for i in dense],
        "OBD, diag GGN": [ggn[i]["W"] * params[i]["W"] ** 2 / 2 for i in dense],
        "magnitude": [jnp.abs(params[i]["W"]) for i in dense],
    }


def masks_at(scores: list[jax.Array], sparsity: float, params) -> tuple:
    """A 0/1 tree like ``params``: the ``sparsity`` fraction of weights with the lowest scores (ranked over all
    layers together) set to 0; biases kept."""
    flat = np.concatenate([np.asarray(s).ravel() for s in scores])
    pruned = int(round(sparsity * flat.size))
    order = np.argsort(flat, kind="stable")
    keep = np.ones(flat.size, bool)
    keep[order[:pruned]] = False
    masks, offset, layer = [], 0, 0
    for entry in params:
        if not entry:
            masks.append(())
            continue
        size = scores[layer].size
        W = jnp.asarray(keep[offset : offset + size].reshape(scores[layer].shape), entry["W"].dtype)
        masks.append({"W": W, "b": jnp.ones_like(entry["b"])})
        offset, layer = offset + size, layer + 1
    return tuple(masks)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--retrain-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("experiments/out"))
    parser.add_argument("--quick", action="store_true", help="3 sparsities, 3 epochs: a smoke test")
    args = parser.parse_args(argv)
    sparsities = [0.0, 0.5, 0.9] if args.quick else [s / 100 for s in range(0, 100, 5)]
    epochs = 3 if args.quick else args.epochs

    data = mnet.data.load_digits(args.seed)
    net, loss = mnet.mlp([128, 64, 10], "tanh"), mnet.losses.softmax_cross_entropy
    _, params = net.init(jax.random.key(args.seed), data.example_shape, jnp.float32)
    params = mnet.fit(net, loss, params, data, epochs=epochs, batch_size=32, seed=args.seed).params
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)

    accuracy = jax.jit(lambda p: jnp.mean(jnp.argmax(net.apply(p, x_test), axis=1) == y_test))
    gradient = jax.jit(mnet.value_and_grad(net, loss))
    optimizer = optax.adam(1e-3)

    @jax.jit
    def retrain_step(p, state, masks, xb, yb):
        _, grads = gradient(p, xb, yb)
        updates, state = optimizer.update(grads, state, p)
        masked = jax.tree_util.tree_map(lambda u, m: u * m, updates, masks)  # pruned weights stay at zero
        return optax.apply_updates(p, masked), state

    def retrain(p, masks):
        state, rng = optimizer.init(p), np.random.default_rng(args.seed)
        for _ in range(args.retrain_epochs):
            order = rng.permutation(x.shape[0])
            for start in range(0, x.shape[0] - 31, 32):
                batch = order[start : start + 32]
                p, state = retrain_step(p, state, masks, x[batch], y[batch])
        return p

    scores = saliencies(net, loss, params, x, y)
    results: dict[str, dict[str, list[float]]] = {"pruned": {}, "retrained": {}}
    for criterion in CRITERIA:
        results["pruned"][criterion], results["retrained"][criterion] = [], []
        for sparsity in sparsities:
            masks = masks_at(scores[criterion], sparsity, params)
            pruned = jax.tree_util.tree_map(lambda w, m: w * m, params, masks)
            results["pruned"][criterion].append(float(accuracy(pruned)))
            results["retrained"][criterion].append(float(accuracy(retrain(pruned, masks))))

    print(f"test accuracy of the tanh MLP 64-128-64-10 after pruning ({epochs} epochs of training; "
          f"retrained {args.retrain_epochs} epochs)")
    print(f"{'sparsity':>9} " + " ".join(f"{c + ' / +retrain':>32}" for c in CRITERIA))
    for index, sparsity in enumerate(sparsities):
        cells = [f"{results['pruned'][c][index]:.3f} / {results['retrained'][c][index]:.3f}" for c in CRITERIA]
        print(f"{sparsity:>9.0%} " + " ".join(f"{cell:>32}" for cell in cells))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, (kind, title) in zip(axes, [("pruned", "pruned, no retraining"),
                                          ("retrained", f"pruned, then {args.retrain_epochs} epochs retraining")]):
        for criterion, style in zip(CRITERIA, ("o-", "s--", "^:")):
            axis.plot([100 * s for s in sparsities], results[kind][criterion], style, label=criterion, markersize=4)
        axis.set_title(title)
        axis.set_xlabel("weights pruned (%)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend()
    figure.suptitle("Optimal Brain Damage vs magnitude pruning, digits MLP 64-128-64-10 (tanh)")
    figure.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out / "pruning.png", dpi=110)
    plt.close(figure)
    return results


if __name__ == "__main__":
    main()
