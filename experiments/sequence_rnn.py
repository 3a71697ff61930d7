"""An LSTM and a GRU (backpropagation through time by hand) beside the tiny transformer on the odd-one-out task,
test accuracy against training steps.

The task (:func:`mnet.data.odd_one_out`): ``pairs`` tokens twice each and one token once, shuffled; the label is
the token seen once. A recurrence reads the tokens one at a time, so it must carry in its state which tokens it
has seen an odd number of times, across the whole sequence; the transformer compares every position with every
other at once.

    python experiments/sequence_rnn.py [--epochs 12] [--pairs 4] [--quick] [--out experiments/out]

Prints each model's test accuracy per epoch and writes ``sequence_rnn.png`` (accuracy against steps).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import mnet
from mnet.training.checkpoint import atomic_write


def models(vocab: int, width: int) -> dict:
    """The three contenders, each from token ids to class logits."""
    recurrent = lambda cell: mnet.serial(  # noqa: E731
        mnet.Embedding(vocab, width), cell(2 * width), mnet.LastStep(), mnet.Dense(vocab)
    )
    return {
        "LSTM": recurrent(mnet.LSTM),
        "GRU": recurrent(mnet.GRU),
        "transformer": mnet.models.transformer_classifier(vocab, vocab, width=width, heads=4),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train", type=int, default=30000)
    parser.add_argument("--vocab", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few hundred examples and two epochs (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path("experiments/out"))
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.train = 2, 512

    dataset = mnet.data.load_odd_one_out(args.seed, args.train, 500 if args.quick else 2000, args.vocab, args.pairs)
    steps_per_epoch = args.train // args.batch
    histories = {}
    for name, net in models(args.vocab, 32).items():
        _, params = net.init(jax.random.key(args.seed), dataset.example_shape, jnp.float32)
        optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, args.epochs * steps_per_epoch))
        result = mnet.fit(net, mnet.losses.softmax_cross_entropy, params, dataset, optimizer=optimizer,
                          epochs=args.epochs, batch_size=args.batch, seed=args.seed)
        histories[name] = result.history.test_accuracy
        print(f"{name:>11}: test accuracy by epoch " + " ".join(f"{a:.3f}" for a in result.history.test_accuracy))
    print(f"chance among the tokens present: {1 / (args.pairs + 1):.3f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, accuracy in histories.items():
        axis.plot([steps_per_epoch * (e + 1) for e in range(len(accuracy))], accuracy, marker="o", label=name)
    axis.axhline(1 / (args.pairs + 1), color="grey", linestyle=":", label="chance among present tokens")
    axis.set(xlabel="training step", ylabel="test accuracy", title=f"odd one out, {2 * args.pairs + 1} tokens")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "sequence_rnn.png", lambda file: figure.savefig(file, format="png", dpi=110))
    plt.close(figure)
    return histories


if __name__ == "__main__":
    main()
