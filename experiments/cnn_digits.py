"""A small CNN (im2col convolutions, max pooling) trained on the bundled 8x8 digits with hand-derived gradients,
then the same network trained with jax.grad, and the time per training step of both side by side.

    python experiments/cnn_digits.py [--epochs 20] [--seed 0] [--batch-norm] [--out experiments/out]

``--batch-norm`` puts a BatchNorm after each convolution and the hidden dense layer (``digits_cnn(batch_norm=True)``):
fit then carries the running statistics, and the test accuracy uses them (evaluation mode).

Prints the test accuracy of both runs, the largest parameter difference between them and the step times;
writes ``cnn_digits.png`` (training curves).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp

import mnet
from mnet.bench.problems import describe_step_seconds, step_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batch-norm", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("experiments/out"))
    args = parser.parse_args()

    dataset = mnet.data.load_digits(args.seed)
    net = mnet.models.digits_cnn(batch_norm=args.batch_norm)
    _, params = net.init(jax.random.key(args.seed), dataset.example_shape, jnp.float32)
    loss = mnet.losses.softmax_cross_entropy
    print(net)
    runs = {grad: mnet.fit(net, loss, params, dataset, epochs=args.epochs, batch_size=args.batch, seed=args.seed,
                           grad=grad) for grad in ("manual", "autodiff")}
    for grad, run in runs.items():
        print(f"{grad:>8}: test accuracy {run.history.test_accuracy[-1]:.4f}, train loss {run.history.train_loss[-1]:.4f}")
    difference = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree_util.tree_leaves(runs["manual"].params), jax.tree_util.tree_leaves(runs["autodiff"].params)))
    print(f"largest |difference| between the two runs' final parameters: {difference:.2e}")

    x = jnp.asarray(dataset.x_train[: args.batch])
    y = jnp.asarray(dataset.y_train[: args.batch])
    print(describe_step_seconds(step_seconds(net, params, x, y, rounds=30), args.batch, 30))
    args.out.mkdir(parents=True, exist_ok=True)
    name = "cnn_digits_batch_norm.png" if args.batch_norm else "cnn_digits.png"
    mnet.train.plot_history(runs["manual"].history, args.out / name, "digits CNN, hand-derived gradients")


if __name__ == "__main__":
    main()
