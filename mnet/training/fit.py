"""Training: any network, any loss, any optax optimizer, with hand-derived or autodiff gradients.

One epoch is one jitted call: the training set is shuffled by a permutation drawn from ``fold_in(seed, epoch)``
(which also seeds the dropout masks of a network that has dropout)
and cut into minibatches that ``jax.lax.scan`` steps through, with the parameters and optimizer state donated
to the call (updated in place where the backend allows). Because the permutation depends only on the seed
and the epoch number, a run resumed from a checkpoint follows exactly the path of an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mnet import losses
from mnet.core.protocol import Array, Params, apply_layer, call_forward, is_stateful
from mnet.core.protocol import LayerProtocol as Layer
from mnet.core.state import init_state
from mnet.errors import CheckpointError, DataError, DivergenceError, SettingError
from mnet.training import checkpoint, distributed, sharded_checkpoint, sharding
from mnet.training.data import Dataset
from mnet.training.layout import Layout, data_parallel_mesh, epoch_order, make_epoch
from mnet.training.sampling import check_sampling
from mnet.training.steps import GRADIENT_MODES
from mnet.training.trained import model_record


@dataclass
class History:
    """Per-epoch records; ``train_loss`` is the mean minibatch loss the optimizer saw during the epoch."""

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def append(self, **record) -> None:
        for name, value in record.items():
            getattr(self, name).append(value)

    def last(self) -> dict:
        return {name: values[-1] for name, values in self.to_dict().items() if values}

    def to_dict(self) -> dict:
        return {name: list(values) for name, values in vars(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> History:
        return cls(**{name: list(data.get(name, [])) for name in vars(cls())})


@dataclass
class FitResult:
    params: Params
    opt_state: Any
    history: History
    state: Any = ()  # the model state (BatchNorm's running statistics); () for a network without one


def make_evaluate(net: Layer, loss: losses.Loss) -> Callable:
    """Jitted ``(params, x, y, state=()) -> (loss, accuracy)``; accuracy is NaN for losses that are not classifiers.
    A network that keeps state is evaluated with its running statistics (evaluation mode); ``y`` may be the pair
    ``(labels, mask)`` of padded sequences."""

    def evaluate(params, x, y, state=()):
        if isinstance(y, tuple):  # padded sequences: (labels, mask)
            masked, labels = losses.with_mask(loss, *y)
            outputs = call_forward(net, params, x, mask=y[1])[0]
            return masked.value(outputs, labels), masked.accuracy(outputs, labels)
        outputs = call_forward(net, params, x, state=state)[0] if is_stateful(net) else apply_layer(net, params, x)
        return loss.value(outputs, y), loss.accuracy(outputs, y)

    return jax.jit(evaluate)


def check_targets(net: Layer, loss: losses.Loss, params: Params, x, *labels) -> None:
    """Refuse targets the network's outputs cannot hold (inside the jitted epoch they would only show as a NaN loss):
    for softmax cross-entropy every label must lie in ``[0, classes)``, ``classes`` the output width
    (:meth:`mnet.losses.Loss.check_targets`)."""
    outputs = jax.eval_shape(lambda p, inputs: net.forward(p, inputs)[0], params, x[:1])
    for part, y in zip(("training", "test"), labels):
        loss.check_targets(outputs.shape, y, f"fit: the {part} labels")


def epoch_key(seed: int, epoch: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), epoch)


def fit(
    net: Layer,
    loss: losses.Loss,
    params: Params,
    data: Dataset,
    *,
    optimizer: optax.GradientTransformation | None = None,
    epochs: int = 10,
    batch_size: int = 32,
    seed: int = 0,
    grad: str = "manual",
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    config: dict | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    devices: int | None = None,
    layout: str = "replicated",
    model_devices: int | None = None,
    sampling: str = "shuffle",
) -> FitResult:
    """Train ``net`` on ``data``; named after Keras's ``fit`` since it is the same job: epochs over a dataset.

    Arguments:
        net, loss: the network and the loss to minimise.
        params: initial parameters (copied, never consumed: the donated buffers are fit's own).
        data: a :class:`mnet.data.Dataset` (features and integer labels; for sequences of several lengths, its
            ``mask_train``/``mask_test`` padding masks reach every attention layer and the loss, batch by batch).
        optimizer: any optax transformation (default ``optax.adam(1e-3)``).
        epochs: total number of epochs (a resumed run continues up to this number).
        batch_size: minibatch size; must not exceed the number of training examples.
        seed: seeds every epoch's shuffle (``fold_in(seed, epoch)``).
        grad: ``"manual"`` (hand-derived, the default) or ``"autodiff"`` (``jax.value_and_grad``), through the
            same loop; or a function ``(params, x, targets) -> (value, grads)`` such as
            :func:`mnet.clipped_value_and_grad` for DP-SGD. With ``"manual"`` an optimizer that takes extra
            arguments is told ``batch_gradient=True`` (:func:`mnet.training.make_step`), so :func:`mnet.kfac`
            computes its direction in factored form.
        checkpoint_path: if given, a training checkpoint (params, optimizer state, the model state of a network
            with BatchNorm, epoch, seed, history, ``config``) is written atomically after every epoch whose loss is
            finite: one safetensors file, or with a path ending in ``.orbax`` a sharded orbax checkpoint directory
            that every process writes its own shards to (:mod:`mnet.training.sharded_checkpoint`).
        resume: continue from ``checkpoint_path`` if it exists (it must match the parameters and optimizer).
        overwrite: start afresh even though ``checkpoint_path`` exists, replacing it. Without ``resume`` or
            ``overwrite`` an existing checkpoint is refused: a run never overwrites earlier work unasked.
        config: JSON-serialisable description stored in the checkpoint; resuming refuses a different one.
        on_epoch: called as ``on_epoch(epoch, record)`` after every epoch, for progress display.
        devices: data-parallel training over this many devices (0: all; every process's devices when several
            processes have joined through :func:`mnet.distributed.initialize`, which is also the default then), the
            batch split over them; None or 1 trains on the default device.
        layout: where the parameters and the optimizer state live on those devices (:mod:`mnet.training.sharding`):
            ``"replicated"`` (every device holds all), ``"fsdp"`` (each weight split over the devices) or
            ``"tensor"`` (paired dense layers split column- then row-wise over ``model_devices``).
        model_devices: the tensor-parallel group size for ``layout="tensor"`` (default: all the devices); the
            batch is split over the ``devices // model_devices`` groups.
        sampling: ``"shuffle"`` (each epoch a permutation cut into batches of ``batch_size``) or ``"poisson"``
            (DP-SGD's: every step, each example joins with probability ``batch_size / examples``; one device, a
            gradient that weighs rows such as :func:`mnet.clipped_value_and_grad`; the privacy spent is
            ``mnet.dp_epsilon(sigma, batch_size / examples, epochs * (examples // batch_size), delta,
            examples=examples)``).

    Returns:
        :class:`FitResult` with the final params, optimizer state, :class:`History` and model state (``state``:
        the running statistics of a network with BatchNorm, made by :func:`mnet.init_state` and moved every step in
        training mode; the test figures use them, in evaluation mode).

    Raises:
        DivergenceError: the training loss, or any parameter, became NaN or infinite; names the epoch, and the
            checkpoint (if any) still holds the last good epoch.
        DataError: the features or the targets hold NaN or infinite values.
        CheckpointError: ``checkpoint_path`` exists and neither ``resume`` nor ``overwrite`` is set, or it cannot
            be resumed (another configuration, optimizer or network).
    """
    optimizer = optimizer or optax.adam(1e-3)
    devices = _checked_settings(data, grad, batch_size, devices, layout, epochs)
    _refuse_non_finite(data)
    check_masks(data, is_stateful(net))
    if checkpoint_path is not None and Path(checkpoint_path).exists() and not (resume or overwrite):
        raise CheckpointError(
            f"{checkpoint_path} already exists: resume from it, or overwrite it explicitly (a new run never "
            "replaces a checkpoint unasked)"
        )
    params = jax.tree_util.tree_map(jnp.array, params)  # a private copy, since the epoch donates its buffers
    opt_state = optimizer.init(params)
    # The model state (BatchNorm's running statistics) is trained beside the params and saved with them; a network
    # without state has () and its checkpoints hold (params, optimizer state) exactly as before.
    stateful = is_stateful(net)
    state = init_state(net, params, np.shape(data.x_train)[1:]) if stateful else ()
    config = dict(config or {}, seed=seed, batch_size=batch_size)
    history, start = History(), 0
    if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
        params, opt_state, state, history, start = _resumed(checkpoint_path, config, stateful, params, opt_state, state)

    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    # Features follow the parameters' dtype; integer features (token ids for an Embedding) stay integers.
    feature_dtype = None if np.issubdtype(np.asarray(data.x_train).dtype, np.integer) else dtype
    check_targets(net, loss, params, jnp.asarray(data.x_train[:1], feature_dtype), data.y_train, data.y_test)
    evaluate = make_evaluate(net, loss)
    mesh = _mesh(devices, layout, model_devices)
    # Evaluation reads the data from the default device, put there once.
    x_seen, y_seen = jnp.asarray(data.x_train, feature_dtype), targets_of(data.y_train, data.mask_train)
    x_test, y_test = jnp.asarray(data.x_test, feature_dtype), targets_of(data.y_test, data.mask_test)
    plan: Layout | None = None
    if mesh is not None:
        # Every array of the run is a global array on the mesh; each process fills only its own devices' shards.
        example = jax.ShapeDtypeStruct((1,) + np.shape(data.x_train)[1:], x_seen.dtype)
        plan = Layout.build(mesh, net, params, opt_state, layout, example)
        params, opt_state, state = (
            sharding.place(t, w)
            for t, w in ((params, plan.params), (opt_state, plan.opt_state), (state, plan.replicated))
        )
    check_sampling(sampling, grad, stateful, plan is not None)
    run_epoch = make_epoch(net, loss, optimizer, batch_size, grad, layout=plan, sampling=sampling)
    on_host = plan is not None  # on a mesh the minibatches are cut on the host
    batches = _EpochInputs(
        plan,
        x_seen,
        y_seen,
        np.asarray(data.x_train, feature_dtype) if on_host else None,
        targets_of(data.y_train, data.mask_train, np.asarray) if on_host else None,
    )

    described = model_record(net, loss, data)  # the network as data, so the checkpoint serves without this script
    for epoch in range(start + 1, epochs + 1):
        began = time.perf_counter()
        new_params, new_opt_state, new_state, train_loss = run_epoch(
            params, opt_state, state, *batches(epoch_key(seed, epoch), batch_size)
        )
        train_loss = float(sharding.to_host(train_loss))
        # The parameters too: a loss can stay finite while they are not (an activation that hides a NaN).
        broken = None if math.isfinite(train_loss) else f"the training loss is {train_loss}"
        if broken is None and not bool(sharding.to_host(_all_finite(new_params))):
            broken = "a parameter is NaN or infinite (the gradients or the update overflowed)"
        if broken is not None:
            kept = f"; {checkpoint_path} still holds epoch {epoch - 1}" if checkpoint_path and epoch > 1 else ""
            raise DivergenceError(f"training diverged at epoch {epoch}: {broken}{kept}")
        params, opt_state, state = new_params, new_opt_state, new_state
        record = _epoch_record(evaluate, params, state, (x_seen, y_seen), (x_test, y_test), epoch, train_loss)
        record["seconds"] = time.perf_counter() - began
        history.append(**record)
        if checkpoint_path is not None:
            saved = (params, opt_state, state) if stateful else (params, opt_state)
            _save_checkpoint(checkpoint_path, saved, {"epoch": epoch, "config": config, "model": described}, history)
        if on_epoch is not None:
            on_epoch(epoch, record)
    return FitResult(params, opt_state, history, state)


@jax.jit
def _all_finite(tree) -> Array:
    leaves = jax.tree_util.tree_leaves(tree)
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def targets_of(labels: Any, mask: Any, as_array: Callable = jnp.asarray) -> Any:
    """The labels a run carries, as ``as_array`` makes them (on the device, or on the host for a mesh): the array, or
    for padded sequences the pair ``(labels, mask)``."""
    return as_array(labels) if mask is None else (as_array(labels), as_array(mask))


def check_masks(data: Dataset, stateful: bool) -> None:
    """Padding masks come for both splits or neither, boolean, one row per example and one column per position."""
    given = [name for name in ("mask_train", "mask_test") if getattr(data, name) is not None]
    if not given:
        return
    if len(given) == 1:
        raise DataError(f"fit: the dataset has {given[0]} but not the other split's; give both or neither")
    if stateful:
        raise SettingError("fit: a network that keeps state (BatchNorm) trains without padding masks")
    for split in ("train", "test"):
        mask, x = np.asarray(getattr(data, f"mask_{split}")), np.asarray(getattr(data, f"x_{split}"))
        if mask.dtype != bool or mask.ndim != 2 or mask.shape != x.shape[:2]:
            raise DataError(
                f"fit: mask_{split} must be booleans of shape (examples, T) = {x.shape[:2]} like x_{split}'s first "
                f"axes, got {mask.dtype} of shape {mask.shape}"
            )


def _refuse_non_finite(data: Dataset) -> None:
    """NaN or infinite data would train to nonsense, refused before the first step."""
    for name in ("x_train", "y_train", "x_test", "y_test"):
        values = np.asarray(getattr(data, name))
        if np.issubdtype(values.dtype, np.inexact) and values.size and not np.isfinite(values).all():
            count = int(values.size - np.isfinite(values).sum())
            raise DataError(f"fit: {name} holds {count} NaN or infinite values; clean or drop those examples first")


def _mesh(devices: int | None, layout: str, model_devices: int | None):
    """The ``("data", "model")`` mesh to train on (None: the default device alone); the tensor layout's model axis
    is ``model_devices``, by default every device."""
    model = 1
    if layout == "tensor":
        model = model_devices or (len(jax.devices()) if devices == 0 else int(devices or 1))
    return data_parallel_mesh(devices, model)


def _checked_settings(
    data: Dataset, grad: Any, batch_size: int, devices: int | None, layout: str, epochs: int
) -> int | None:
    """Refuse settings ``fit`` cannot run; the devices to train on (all of them when several processes joined)."""
    if not (isinstance(epochs, int) and epochs >= 0):
        raise SettingError(f"fit: epochs must be an int >= 0 (the total, counting a resumed run's), got {epochs!r}")
    if not callable(grad) and grad not in GRADIENT_MODES:
        raise SettingError(f"grad must be one of {GRADIENT_MODES} or a value_and_grad-like function, got {grad!r}")
    if not (isinstance(batch_size, int) and 0 < batch_size <= len(data.x_train)):
        raise SettingError(
            f"batch_size must be between 1 and the {len(data.x_train)} training examples, got {batch_size}"
        )
    if devices is None and jax.process_count() > 1:
        devices = 0  # processes that have joined train together, over all their devices
    if layout not in sharding.LAYOUTS:
        raise SettingError(f"layout must be one of {sharding.LAYOUTS}, got {layout!r}")
    if layout != "replicated" and devices is None:
        raise SettingError(f"layout {layout!r} shards the parameters over devices: pass devices= as well")
    return devices


#: The parts of a training checkpoint, in the order they are saved.
CHECKPOINT_PARTS = ("the parameters", "the optimizer state", "the model state")


def _resumed(path: str | Path, config: dict, stateful: bool, params: Params, opt_state: Any, state: Any) -> tuple:
    """``(params, opt_state, state, history, epoch)`` from the checkpoint, which must be of this configuration."""
    written = checkpoint.read_metadata(path).get("config")
    if written != config:
        raise CheckpointError(f"{path}: cannot resume with other settings: {config_difference(written, config)}")
    like = (params, opt_state, state) if stateful else (params, opt_state)
    restored, meta = checkpoint.read_tree(path, like, CHECKPOINT_PARTS)
    params, opt_state, state = restored if stateful else (*restored, ())
    return params, opt_state, state, History.from_dict(meta["history"]), int(meta["epoch"])


def config_difference(written: Any, now: dict) -> str:
    """One line: each setting that differs, as ``lr 0.001 in the checkpoint, 0.01 now``."""
    if not isinstance(written, dict):
        return "the checkpoint records no configuration"
    names = [name for name in dict.fromkeys([*written, *now]) if written.get(name) != now.get(name)]
    return "; ".join(f"{name} {written.get(name)!r} in the checkpoint, {now.get(name)!r} now" for name in names)


@dataclass
class _EpochInputs:
    """What one epoch's jitted call takes besides the parameters: on one device the whole training set and the
    epoch's key (the permutation runs on the device); on a mesh the epoch's minibatches cut on the host, each process
    reading only its own devices' rows, and the key's data."""

    plan: Layout | None
    x_device: Array
    y_device: Array
    x_host: np.ndarray | None
    y_host: Any

    def __call__(self, key: Array, batch_size: int) -> tuple:
        if self.plan is None or self.x_host is None or self.y_host is None:
            return self.x_device, self.y_device, key
        plan, order = self.plan, np.asarray(epoch_order(key, len(self.x_host), batch_size))
        key_data = sharding.place(np.asarray(jax.random.key_data(key)), plan.replicated)
        ys = jax.tree_util.tree_map(lambda host: plan.gather_batches(host, order), self.y_host)
        return plan.gather_batches(self.x_host, order), ys, key_data


def _epoch_record(evaluate, params, state, seen: tuple, test: tuple, epoch: int, train_loss: float) -> dict:
    """The epoch's figures. Across processes every process computes them alike, from the parameters gathered
    whole."""
    measured = (params, state) if jax.process_count() == 1 else sharding.to_host((params, state))
    _, train_accuracy = evaluate(measured[0], *seen, measured[1])
    test_loss, test_accuracy = evaluate(measured[0], *test, measured[1]) if len(test[0]) else (np.nan, np.nan)
    return dict(
        epoch=epoch,
        train_loss=train_loss,
        train_accuracy=float(train_accuracy),
        test_loss=float(test_loss),
        test_accuracy=float(test_accuracy),
    )


def _save_checkpoint(path: str | Path, saved: Any, meta: dict, history: History) -> None:
    """Process 0 writes (atomically) what every process holds alike; the barrier keeps the others from running ahead
    of a checkpoint that is not on disk yet. A sharded checkpoint (``*.orbax``) is written by every process, each its
    own shards."""
    if sharded_checkpoint.is_sharded(path):
        sharded_checkpoint.save_sharded(path, saved, {**meta, "history": history.to_dict()})
        return
    tree = sharding.to_host(saved)
    if distributed.is_leader():
        checkpoint.save_tree(path, tree, {**meta, "history": history.to_dict()})
    distributed.barrier(f"mnet checkpoint epoch {meta['epoch']}")
