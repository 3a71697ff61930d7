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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mnet import checkpoint, losses
from mnet.backprop import value_and_grad, value_grad_and_state
from mnet.data import Dataset
from mnet.errors import CheckpointError, DivergenceError
from mnet.layers.base import LayerProtocol as Layer
from mnet.layers.base import Params, apply_layer, call_forward, is_stateful, is_stochastic
from mnet.layers.state import init_state
from mnet.reference import autodiff_value_and_grad, autodiff_value_grad_and_state

GRADIENT_MODES = ("manual", "autodiff")


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


def gradient_function(net: Layer, loss: losses.Loss, grad: str | Callable):
    """``value_and_grad`` by hand (``"manual"``), the autodiff reference (``"autodiff"``), or any function with
    their signature ``(params, x, targets) -> (value, grads)`` (e.g. :func:`mnet.clipped_value_and_grad`)."""
    if callable(grad):
        return grad
    if grad == "manual":
        return value_and_grad(net, loss)
    if grad == "autodiff":
        return autodiff_value_and_grad(net, loss)
    raise ValueError(f"grad must be one of {GRADIENT_MODES}, got {grad!r}")


def stateful_gradient_function(net: Layer, loss: losses.Loss, grad: str | Callable):
    """For a network that keeps state: ``value_grad_and_state`` by hand or its autodiff reference; a function of
    its own is refused (it could not return the new running statistics)."""
    if grad == "manual":
        return value_grad_and_state(net, loss)
    if grad == "autodiff":
        return autodiff_value_grad_and_state(net, loss)
    raise ValueError(
        f"{net!r} keeps state (BatchNorm), so fit needs grad='manual' or 'autodiff' to update the running statistics, "
        f"got {grad!r}"
    )


def make_step(value_and_grad_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """One optimizer step ``(params, opt_state, x, y, optimizer_key=None, **kwargs) -> (params, opt_state, loss
    value)``; keyword arguments (a dropout key, ``train=True``) go to the gradient function. An optimizer that takes
    extra arguments (``optax.GradientTransformationExtraArgs``, such as :func:`mnet.kfac`) also gets the batch,
    ``inputs=x, targets=y``, and ``key=optimizer_key``; optax's own transformations ignore them."""

    def step(params, opt_state, x, y, optimizer_key=None, **kwargs):
        value, grads = value_and_grad_fn(params, x, y, **kwargs)
        return (*_apply_update(optimizer, grads, params, opt_state, x, y, optimizer_key), value)

    return step


def _apply_update(optimizer: optax.GradientTransformation, grads, params, opt_state, x, y, optimizer_key):
    """``(params, opt_state)`` after one update; an optimizer that takes extra arguments also gets the batch."""
    if isinstance(optimizer, optax.GradientTransformationExtraArgs):
        updates, opt_state = optimizer.update(grads, opt_state, params, inputs=x, targets=y, key=optimizer_key)
    else:
        updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def make_stateful_step(value_grad_and_state_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """:func:`make_step` carrying the model state: ``(params, opt_state, state, x, y, optimizer_key=None, **kwargs)
    -> (params, opt_state, state, loss value)``. The step's new state comes from the same forward pass as the
    gradient (training mode)."""

    def step(params, opt_state, state, x, y, optimizer_key=None, **kwargs):
        value, grads, state = value_grad_and_state_fn(params, state, x, y, key=kwargs.get("key"))
        params, opt_state = _apply_update(optimizer, grads, params, opt_state, x, y, optimizer_key)
        return params, opt_state, state, value

    return step


def data_parallel_mesh(devices: int | None) -> Mesh | None:
    """A one-axis ``Mesh`` named ``"data"`` over the first ``devices`` devices (all of them for 0), or None for
    plain single-device training. For several hosts, call ``jax.distributed.initialize()`` first: ``jax.devices()``
    then lists every host's devices and the same mesh spans them."""
    if devices is None or devices == 1:
        return None
    available = jax.devices()
    count = len(available) if devices == 0 else devices
    if not 1 <= count <= len(available):
        raise ValueError(
            f"asked for {devices} devices but only {len(available)} are available "
            f"({available[0].platform}); on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N adds more"
        )
    return Mesh(np.array(available[:count]), ("data",))


def make_epoch(
    net: Layer,
    loss: losses.Loss,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    grad: str | Callable = "manual",
    mesh: Mesh | None = None,
) -> Callable:
    """The jitted epoch ``(params, opt_state, state, x, y, key) -> (params, opt_state, state, mean loss)``; ``state``
    is the model state (BatchNorm's running statistics), ``()`` for a network without one.

    ``len(x) // batch_size`` minibatches per epoch (the few examples left over change with every epoch's
    permutation); params and optimizer state are donated. With a ``mesh``, every minibatch is sharded along
    its batch axis over the mesh's ``"data"`` axis while parameters stay replicated; XLA partitions the step and
    inserts the all-reduce that sums the gradient, so the update is the single-device one.
    """
    if is_stateful(net):
        update = make_stateful_step(stateful_gradient_function(net, loss, grad), optimizer)
    else:
        stateless = make_step(gradient_function(net, loss, grad), optimizer)

        def update(params, opt_state, state, x, y, optimizer_key=None, **extra):
            params, opt_state, value = stateless(params, opt_state, x, y, optimizer_key, **extra)
            return params, opt_state, state, value

    if mesh is not None and batch_size % mesh.size:
        raise ValueError(f"batch_size {batch_size} must be divisible by the {mesh.size} devices")
    shard = (
        (lambda a: a)
        if mesh is None
        else (lambda a: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, PartitionSpec("data"))))
    )

    def epoch(params, opt_state, state, x, y, key):
        steps = x.shape[0] // batch_size
        shuffle_key, dropout_key = jax.random.split(key)
        order = jax.random.permutation(shuffle_key, x.shape[0])[: steps * batch_size].reshape(steps, batch_size)
        step_keys = jax.random.split(dropout_key, steps)

        def step(carry, batch_and_key):
            batch, step_key = batch_and_key
            # A network with randomness (dropout) trains in training mode with a fresh key every step.
            extra = {"key": step_key, "train": True} if is_stochastic(net) else {}
            optimizer_key = jax.random.fold_in(step_key, 1)  # independent of the dropout draws
            *carry, value = update(*carry, shard(x[batch]), shard(y[batch]), optimizer_key, **extra)
            return tuple(carry), value

        (params, opt_state, state), values = jax.lax.scan(step, (params, opt_state, state), (order, step_keys))
        return params, opt_state, state, jnp.mean(values)

    if mesh is None:
        return jax.jit(epoch, donate_argnums=(0, 1, 2))
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(epoch, donate_argnums=(0, 1, 2), in_shardings=replicated, out_shardings=replicated)


def make_evaluate(net: Layer, loss: losses.Loss) -> Callable:
    """Jitted ``(params, x, y, state=()) -> (loss, accuracy)``; accuracy is NaN for losses that are not classifiers.
    A network that keeps state is evaluated with its running statistics (evaluation mode)."""

    def evaluate(params, x, y, state=()):
        outputs = call_forward(net, params, x, state=state)[0] if is_stateful(net) else apply_layer(net, params, x)
        if loss is losses.softmax_cross_entropy:
            accuracy = jnp.mean(jnp.argmax(outputs, axis=-1) == y)
        elif loss is losses.sigmoid_binary_cross_entropy:
            accuracy = jnp.mean((outputs > 0) == (y > 0.5))
        else:
            accuracy = jnp.asarray(jnp.nan)
        return loss.value(outputs, y), accuracy

    return jax.jit(evaluate)


def check_targets(net: Layer, loss: losses.Loss, params: Params, x, *labels) -> None:
    """Refuse class labels the network's outputs cannot hold (inside the jitted epoch they would only show as a NaN
    loss): for softmax cross-entropy every label must lie in ``[0, classes)``, ``classes`` the output width."""
    if loss is not losses.softmax_cross_entropy:
        return
    outputs = jax.eval_shape(lambda p, inputs: net.forward(p, inputs)[0], params, x[:1])
    for part, y in zip(("training", "test"), labels):
        losses.check_labels(y, outputs.shape[-1], f"fit: the {part} labels")


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
    config: dict | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    devices: int | None = None,
) -> FitResult:
    """Train ``net`` on ``data``; named after Keras's ``fit`` since it is the same job: epochs over a dataset.

    Arguments:
        net, loss: the network and the loss to minimise.
        params: initial parameters (copied, never consumed: the donated buffers are fit's own).
        data: a :class:`mnet.data.Dataset` (features and integer labels).
        optimizer: any optax transformation (default ``optax.adam(1e-3)``).
        epochs: total number of epochs (a resumed run continues up to this number).
        batch_size: minibatch size; must not exceed the number of training examples.
        seed: seeds every epoch's shuffle (``fold_in(seed, epoch)``).
        grad: ``"manual"`` (hand-derived, the default) or ``"autodiff"`` (``jax.value_and_grad``), through the
            same loop; or a function ``(params, x, targets) -> (value, grads)`` such as
            :func:`mnet.clipped_value_and_grad` for DP-SGD.
        checkpoint_path: if given, a training checkpoint (params, optimizer state, the model state of a network
            with BatchNorm, epoch, seed, history, ``config``) is written atomically after every epoch whose loss is
            finite.
        resume: continue from ``checkpoint_path`` if it exists (it must match the parameters and optimizer).
        config: JSON-serialisable description stored in the checkpoint; resuming refuses a different one.
        on_epoch: called as ``on_epoch(epoch, record)`` after every epoch, for progress display.
        devices: data-parallel training over this many devices (0: all), batch sharded and parameters
            replicated; None or 1 trains on the default device.

    Returns:
        :class:`FitResult` with the final params, optimizer state, :class:`History` and model state (``state``:
        the running statistics of a network with BatchNorm, made by :func:`mnet.init_state` and moved every step in
        training mode; the test figures use them, in evaluation mode).

    Raises:
        DivergenceError: the training loss became NaN or infinite; names the epoch, and the checkpoint (if any)
            still holds the last good epoch.
    """
    optimizer = optimizer or optax.adam(1e-3)
    if not callable(grad) and grad not in GRADIENT_MODES:
        raise ValueError(f"grad must be one of {GRADIENT_MODES} or a value_and_grad-like function, got {grad!r}")
    if not 0 < batch_size <= len(data.x_train):
        raise ValueError(
            f"batch_size must be between 1 and the {len(data.x_train)} training examples, got {batch_size}"
        )
    params = jax.tree_util.tree_map(jnp.array, params)  # a private copy, since the epoch donates its buffers
    opt_state = optimizer.init(params)
    # The model state (BatchNorm's running statistics) is trained beside the params and saved with them; a network
    # without state has () and its checkpoints hold (params, optimizer state) exactly as before.
    stateful = is_stateful(net)
    state = init_state(net, params, np.shape(data.x_train)[1:]) if stateful else ()
    saved = (lambda: (params, opt_state, state)) if stateful else (lambda: (params, opt_state))
    history, start = History(), 0
    config = dict(config or {}, seed=seed, batch_size=batch_size)
    if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
        restored, meta = checkpoint.read_tree(checkpoint_path, saved())
        params, opt_state, state = restored if stateful else (*restored, ())
        if meta.get("config") != config:
            raise CheckpointError(
                f"{checkpoint_path}: written by a different configuration "
                f"({meta.get('config')}), cannot resume with {config}"
            )
        history, start = History.from_dict(meta["history"]), int(meta["epoch"])

    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    # Features follow the parameters' dtype; integer features (token ids for an Embedding) stay integers.
    feature_dtype = None if np.issubdtype(np.asarray(data.x_train).dtype, np.integer) else dtype
    x_train, y_train = jnp.asarray(data.x_train, feature_dtype), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test, feature_dtype), jnp.asarray(data.y_test)
    check_targets(net, loss, params, x_train, y_train, y_test)
    mesh = data_parallel_mesh(devices)
    run_epoch = make_epoch(net, loss, optimizer, batch_size, grad, mesh)
    evaluate = make_evaluate(net, loss)

    for epoch in range(start + 1, epochs + 1):
        began = time.perf_counter()
        new_params, new_opt_state, new_state, train_loss = run_epoch(
            params, opt_state, state, x_train, y_train, epoch_key(seed, epoch)
        )
        train_loss = float(train_loss)
        if not math.isfinite(train_loss):
            kept = f"; {checkpoint_path} still holds epoch {epoch - 1}" if checkpoint_path and epoch > 1 else ""
            raise DivergenceError(f"training diverged at epoch {epoch}: the training loss is {train_loss}{kept}")
        params, opt_state, state = new_params, new_opt_state, new_state
        _, train_accuracy = evaluate(params, x_train, y_train, state)
        test_loss, test_accuracy = evaluate(params, x_test, y_test, state) if len(data.x_test) else (np.nan, np.nan)
        record = dict(
            epoch=epoch,
            train_loss=train_loss,
            train_accuracy=float(train_accuracy),
            test_loss=float(test_loss),
            test_accuracy=float(test_accuracy),
            seconds=time.perf_counter() - began,
        )
        history.append(**record)
        if checkpoint_path is not None:
            checkpoint.save_tree(
                checkpoint_path, saved(), {"epoch": epoch, "config": config, "history": history.to_dict()}
            )
        if on_epoch is not None:
            on_epoch(epoch, record)
    return FitResult(params, opt_state, history, state)


def plot_history(history: History, path: str | Path, title: str = "") -> None:
    """Loss and accuracy curves (train and test) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
