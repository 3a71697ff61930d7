"""Pictures of a training run: the loss and accuracy curves of a :class:`mnet.training.fit.History`."""

from __future__ import annotations

from pathlib import Path

from mnet.training import checkpoint
from mnet.training.fit import History


def plot_history(history: History, path: str | Path, title: str = "") -> None:
    """Loss and accuracy curves (train and test) as a PNG, written atomically."""
    # Deferred: matplotlib is slow to import, and its Agg backend must be chosen before pyplot is imported.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: after the backend is chosen

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(history.epoch, history.train_loss, label="train")
    left.plot(history.epoch, history.test_loss, label="test")
    left.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    right.plot(history.epoch, history.train_accuracy, label="train")
    right.plot(history.epoch, history.test_accuracy, label="test")
    right.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for axis in (left, right):
        axis.legend()
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    checkpoint.atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=110))
    plt.close(figure)
