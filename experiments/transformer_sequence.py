"""A tiny transformer (token embedding, one pre-norm block of multi-head self-attention and a GELU MLP) trained
with hand-derived gradients on a synthetic sequence task, and its time per step against jax.grad.

The task, "find the odd one out" (:func:`mnet.data.odd_one_out`): a sequence holds ``pairs`` distinct tokens twice
each and one more token once, shuffled; the label is the token that appears once. Each position must compare
itself with every other position, which is what attention does; a model that sees tokens one at a time cannot
beat guessing among the tokens present (about 1 in ``pairs + 1``). ``mnet train --model transformer`` trains the
same model on the same task.

    python experiments/transformer_sequence.py [--epochs 12] [--train 30000] [--out experiments/out]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import mnet
from mnet.bench.problems import describe_step_seconds, step_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train", type=int, default=30000)
    parser.add_argument("--vocab", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("experiments/out"))
    args = parser.parse_args()

    dataset = mnet.data.load_odd_one_out(args.seed, args.train, 2000, args.vocab, args.pairs)
    x_train, y_train = dataset.x_train, dataset.y_train
    net = mnet.models.transformer_classifier(args.vocab, args.vocab, width=32, heads=4)
    _, params = net.init(jax.random.key(args.seed), dataset.example_shape, jnp.float32)
    steps = args.epochs * (args.train // args.batch)
    optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, steps))
    print(net)
    print(dataset)

    def report(epoch, record):
        print(f"epoch {epoch:>3}: train loss {record['train_loss']:.4f}, test accuracy {record['test_accuracy']:.4f}")

    result = mnet.fit(net, mnet.losses.softmax_cross_entropy, params, dataset, optimizer=optimizer, epochs=args.epochs,
                      batch_size=args.batch, seed=args.seed, on_epoch=report)
    print(f"chance among the tokens present: {1 / (args.pairs + 1):.3f}; "
          f"hand-derived training reached {result.history.test_accuracy[-1]:.4f}")

    seconds = step_seconds(net, params, jnp.asarray(x_train[: args.batch]), jnp.asarray(y_train[: args.batch]), rounds=30)
    print(describe_step_seconds(seconds, args.batch, 30))
    args.out.mkdir(parents=True, exist_ok=True)
    mnet.train.plot_history(result.history, args.out / "transformer_sequence.png", "odd one out, tiny transformer")


if __name__ == "__main__":
    main()
