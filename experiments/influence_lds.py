"""A counterfactual check of influence scores: the linear datamodelling score (LDS; Park et al. 2023), as Kronfluence
evaluates its preconditioners, on the bundled digits.

    python experiments/influence_lds.py [--subsets 40] [--queries 50] [--epochs 30] [--seed 0] [--quick]

An MLP is trained on ``n`` training digits; influence scores ``score(q, n)`` between test queries and the training
examples are computed at the result for each preconditioner. Then the network is retrained from the same
initialisation on ``--subsets`` random halves of the training set (all at once: the training loop is vmapped over
the subsets) and each query's loss measured on every retrained model. Influence predicts that a subset's query loss
is lower the more helpful its examples are, ``predicted(q, S) = -sum_{n in S} score(q, n)``; the LDS is the Spearman
rank correlation, over the subsets, between predicted and measured losses, averaged over the queries (1 would be a
perfect ranking of the counterfactuals, 0 none). Prints a table and writes ``influence_lds.png``; ``--quick`` is a
smoke test.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mnet

LOSS = mnet.losses.softmax_cross_entropy
PRECONDITIONERS = ("ekfac", "kfac", "diag", "identity", "ggn")


def make_trainer(net, steps: int, batch_size: int, learning_rate: float):
    """``train(params, x, y, key) -> params``: Adam on minibatches drawn with replacement, hand-derived gradients,
    one ``lax.scan`` (so that it vmaps over training sets of one size)."""
    value_and_grad = mnet.value_and_grad(net, LOSS)
    optimizer = optax.adam(learning_rate)

    def train(params, x, y, key):
        def step(carry, step_key):
            p, state = carry
            rows = jax.random.randint(step_key, (batch_size,), 0, x.shape[0])
            _, grads = value_and_grad(p, x[rows], y[rows])
            updates, state = optimizer.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(key, steps))
        return params

    return train


def ranks(a: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(a, axis=-1), axis=-1).astype(float)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row by row: the rank correlation of ``a[i]`` and ``b[i]``."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(axis=-1, keepdims=True), rb - rb.mean(axis=-1, keepdims=True)
    return np.sum(ra * rb, axis=-1) / np.sqrt(np.sum(ra**2, axis=-1) * np.sum(rb**2, axis=-1))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=40)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--train", type=int, default=1000, help="training examples used")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("experiments/out"))
    parser.add_argument("--quick", action="store_true", help="200 examples, 6 subsets, 8 queries: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.subsets, args.queries, args.train, args.epochs = 6, 8, 200, 5

    data = mnet.data.load_digits(args.seed)
    x, y = jnp.asarray(data.x_train[: args.train]), jnp.asarray(data.y_train[: args.train])
    qx, qy = jnp.asarray(data.x_test[: args.queries]), jnp.asarray(data.y_test[: args.queries])
    net = mnet.mlp([32, 10], activation="tanh")
    _, init = net.init(jax.random.key(args.seed), data.example_shape, jnp.float32)
    batch_size, n, half = 32, x.shape[0], x.shape[0] // 2
    steps = args.epochs * max(half // batch_size, 1)
    train = jax.jit(make_trainer(net, steps, batch_size, 3e-3))
    key = jax.random.key(args.seed + 1)
    params = train(init, x, y, key)

    rng = np.random.default_rng(args.seed)
    subsets = np.stack([np.sort(rng.choice(n, half, replace=False)) for _ in range(args.subsets)])
    retrained = jax.jit(jax.vmap(partial(train, init), in_axes=(0, 0, None)))(x[subsets], y[subsets], key)
    measured = np.asarray(jax.vmap(lambda p: LOSS.per_example(net.apply(p, qx), qy))(retrained))  # (subsets, Q)
    members = np.zeros((args.subsets, n))
    members[np.arange(args.subsets)[:, None], subsets] = 1.0

    results: dict = {"lds": {}, "n": n, "subsets": args.subsets, "queries": args.queries}
    print(f"MLP 64-32-10 (tanh) on {n} digits, {steps} Adam steps; {args.subsets} retrainings on random halves; "
          f"{args.queries} test queries")
    print(f"{'preconditioner':>15} {'LDS':>7} {'(s.e.)':>7} {'damping':>9}")
    for name in PRECONDITIONERS:
        model = mnet.influence(net, LOSS, params, x, y, preconditioner=name)
        scores = np.asarray(model.scores(qx, qy))  # (Q, n)
        predicted = -(members @ scores.T)  # (subsets, Q)
        per_query = spearman(predicted.T, measured.T)
        results["lds"][name] = {"mean": float(np.mean(per_query)), "per_query": per_query,
                                "predicted": predicted, "damping": model.damping}
        error = np.std(per_query, ddof=1) / np.sqrt(len(per_query))
        print(f"{name:>15} {np.mean(per_query):7.3f} {error:7.3f} {model.damping:9.3g}")
    results["measured"] = measured
    plot(results, args.out / "influence_lds.png")
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(results["lds"])
    means = [results["lds"][k]["mean"] for k in names]
    errors = [np.std(results["lds"][k]["per_query"], ddof=1) / np.sqrt(results["queries"]) for k in names]
    left.bar(names, means, yerr=errors, color="tab:blue", alpha=0.8, capsize=3)
    left.axhline(0, color="grey", lw=1)
    left.set(ylabel="LDS (Spearman, mean over queries)",
             title=f"{results['subsets']} retrainings on random halves of {results['n']} digits")
    left.grid(alpha=0.3, axis="y")
    best = max(names, key=lambda k: results["lds"][k]["mean"])
    query = int(np.argmax(results["lds"][best]["per_query"]))
    right.scatter(results["lds"][best]["predicted"][:, query], results["measured"][:, query], s=14)
    right.set(xlabel=f"predicted by {best}: -sum of the subset's scores", ylabel="measured query loss after retraining",
              title=f"query {query} (its Spearman {results['lds'][best]['per_query'][query]:.2f})")
    right.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
