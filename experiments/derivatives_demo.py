"""Per-example gradient norms over training, and the empirical NTK, on the bundled digits: all hand-derived.

    python experiments/derivatives_demo.py [--epochs 20] [--out experiments/out]

Writes ``per_example_norms.png`` (the distribution of per-example gradient norms after every epoch, by
class: which digits the network still finds hard) and ``ntk_heatmap.png`` (the empirical NTK between 60 test
digits sorted by class, before and after training: the block structure that emerges is the kernel learning the
classes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("experiments/out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    dataset = mnet.data.load_digits(0)
    net = mnet.mlp([128, 10])
    loss = mnet.losses.softmax_cross_entropy
    _, params = net.init(jax.random.key(0), dataset.example_shape)
    norms_fn = jax.jit(mnet.per_example_grad_norms(net, loss))
    ntk_fn = jax.jit(mnet.ntk(net))
    x_train, y_train = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
    order = np.concatenate([np.flatnonzero(dataset.y_test == c)[:6] for c in range(10)])
    probe = jnp.asarray(dataset.x_test[order])

    kernels = {"initialisation": np.asarray(ntk_fn(params, probe, probe))}
    epoch_norms = [np.asarray(norms_fn(params, x_train, y_train))]
    for epoch in range(args.epochs):
        params = mnet.fit(net, loss, params, dataset, optimizer=optax.adam(1e-3), epochs=1, seed=epoch).params
        epoch_norms.append(np.asarray(norms_fn(params, x_train, y_train)))
    kernels[f"after {args.epochs} epochs"] = np.asarray(ntk_fn(params, probe, probe))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    epochs = np.arange(len(epoch_norms))
    stacked = np.stack(epoch_norms)
    for q, style in ((50, "-"), (90, "--"), (99, ":")):
        left.plot(epochs, np.percentile(stacked, q, axis=1), "k" + style, label=f"{q}th percentile")
    left.set(yscale="log", xlabel="epoch", ylabel="per-example gradient norm", title="all training examples")
    left.legend()
    final = epoch_norms[-1]
    right.boxplot([final[dataset.y_train == c] for c in range(10)], showfliers=False)
    right.set_xticks(range(1, 11), [str(c) for c in range(10)])
    right.set(yscale="log", xlabel="digit", ylabel="per-example gradient norm", title=f"by class after {args.epochs} epochs")
    figure.tight_layout()
    figure.savefig(args.out / "per_example_norms.png", dpi=100)

    figure, axes = plt.subplots(1, 2, figsize=(11, 5))
    for axis, (title, kernel) in zip(axes, kernels.items()):
        scale = np.sqrt(np.outer(np.diag(kernel), np.diag(kernel)))
        image = axis.imshow(kernel / scale, cmap="viridis", vmin=-0.2, vmax=1)
        axis.set(title=f"normalised empirical NTK, {title}", xticks=np.arange(3, 60, 6), yticks=np.arange(3, 60, 6),
                 xticklabels=range(10), yticklabels=range(10), xlabel="test digit", ylabel="test digit")
    figure.colorbar(image, ax=axes, shrink=0.8)
    figure.savefig(args.out / "ntk_heatmap.png", dpi=100)
    print(f"median per-example gradient norm: {np.median(epoch_norms[0]):.3g} at initialisation, "
          f"{np.median(epoch_norms[-1]):.3g} after {args.epochs} epochs")


if __name__ == "__main__":
    main()
