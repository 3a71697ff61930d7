"""Train the same MLP on the bundled digits twice from the same seed, once with hand-derived gradients and once
with jax.grad, and show that the two runs coincide.

    python experiments/hand_vs_autodiff_training.py [--epochs 40] [--dtype float32|float64] [--out experiments/out]

Writes ``hand_vs_autodiff_training.png`` (both loss curves on one plot) and prints the largest difference in
the final parameters.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("experiments/out"))
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", args.dtype == "float64")

    import jax.numpy as jnp
    import numpy as np
    import optax

    import mnet

    dataset = mnet.data.load_digits(args.seed)
    net = mnet.mlp([256, 10])
    _, params = net.init(jax.random.key(args.seed), dataset.example_shape, jnp.dtype(args.dtype))
    loss = mnet.losses.softmax_cross_entropy
    runs = {grad: mnet.fit(net, loss, params, dataset, optimizer=optax.adam(1e-3), epochs=args.epochs,
                           seed=args.seed, grad=grad) for grad in ("manual", "autodiff")}
    differences = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                         runs["manual"].params, runs["autodiff"].params)
    largest = max(jax.tree_util.tree_leaves(differences))
    scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree_util.tree_leaves(runs["autodiff"].params))
    curves = {grad: np.array(run.history.train_loss) for grad, run in runs.items()}
    gap = float(np.max(np.abs(curves["manual"] - curves["autodiff"]) / curves["autodiff"]))
    print(f"{args.dtype}, {args.epochs} epochs: final test accuracy hand {runs['manual'].history.test_accuracy[-1]:.4f}, "
          f"autodiff {runs['autodiff'].history.test_accuracy[-1]:.4f}")
    print(f"largest |difference| in final parameters: {largest:.3e} (largest parameter magnitude {scale:.3f})")
    print(f"largest relative gap between the two training-loss curves: {gap:.3e}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(6, 4))
    epochs = runs["manual"].history.epoch
    axis.plot(epochs, curves["manual"], lw=3, alpha=0.5, label="hand-derived (train)")
    axis.plot(epochs, curves["autodiff"], "k--", lw=1, label="jax.grad (train)")
    axis.plot(epochs, runs["manual"].history.test_loss, lw=3, alpha=0.5, label="hand-derived (test)")
    axis.plot(epochs, runs["autodiff"].history.test_loss, "k:", lw=1, label="jax.grad (test)")
    axis.set(yscale="log", xlabel="epoch", ylabel="loss",
             title=f"digits, {args.dtype}: max param difference {largest:.1e}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.out / "hand_vs_autodiff_training.png", dpi=100)


if __name__ == "__main__":
    main()
