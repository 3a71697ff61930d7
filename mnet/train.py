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

from mnet import checkpoint, distributed, losses, sharding
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


def data_parallel_mesh(devices: int | None, model: int = 1) -> Mesh | None:
    """A ``("data", "model")`` mesh over the first ``devices`` devices (all of them for 0, every process's once
    :func:`mnet.distributed.initialize` has run), ``model`` per tensor-parallel group; None for plain
    single-device training (see :func:`mnet.sharding.make_mesh`)."""
    if devices is None or (devices == 1 and model == 1):
        return None
    return sharding.make_mesh(devices, model)


def epoch_order(key: jax.Array, examples: int, batch_size: int) -> jax.Array:
    """The epoch's minibatches: ``(steps, batch_size)`` example indices from a permutation drawn from ``key``, the
    same on every device and every process (the few examples left over change with every epoch)."""
    steps = examples // batch_size
    shuffle_key = jax.random.split(key)[0]
    return jax.random.permutation(shuffle_key, examples)[: steps * batch_size].reshape(steps, batch_size)


def step_keys(key: jax.Array, steps: int) -> jax.Array:
    """One key per step of the epoch (dropout masks, a stochastic optimizer), independent of the shuffle."""
    return jax.random.split(jax.random.split(key)[1], steps)


@dataclass(frozen=True)
class Layout:
    """Where the arrays of a run on a mesh live: ``params``, ``opt_state`` and ``batches`` (``(steps, batch, ...)``
    split over ``"data"``) as shardings, everything else replicated (see :mod:`mnet.sharding`)."""

    mesh: Mesh
    params: Any
    opt_state: Any

    @classmethod
    def build(cls, mesh: Mesh, net: Layer, params: Params, opt_state: Any, layout: str) -> Layout:
        specs = sharding.parameter_specs(net, params, layout, mesh)
        return cls(
            mesh,
            sharding.shardings(mesh, specs),
            sharding.shardings(mesh, sharding.follow_parameters(opt_state, params, specs)),
        )

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batches(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(None, "data"))

    def gather_batches(self, host: np.ndarray, order: np.ndarray) -> jax.Array:
        """``host[order]`` as one global array split over ``"data"``: each process reads from ``host`` only the rows
        its own devices hold (a memory-mapped dataset is read only there)."""
        shape = order.shape + np.shape(host)[1:]

        def rows(index: Any) -> np.ndarray:
            return host[order[index[0], index[1]]]

        return jax.make_array_from_callback(shape, self.batches, rows)


def make_epoch(
    net: Layer,
    loss: losses.Loss,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    grad: str | Callable = "manual",
    layout: Layout | None = None,
) -> Callable:
    """The jitted epoch; params, optimizer state and model state are donated. ``state`` is the model state
    (BatchNorm's running statistics), ``()`` for a network without one.

    On one device, ``(params, opt_state, state, x, y, key) -> (params, opt_state, state, mean loss)``: the whole
    training set goes in, and the minibatches of :func:`epoch_order` are cut from it inside.

    On a mesh (``layout``), ``(params, opt_state, state, xs, ys, key_data) -> ...``: the minibatches arrive cut already, ``(steps, batch,
    ...)`` split over ``"data"`` (:meth:`Layout.gather_batches`), and ``key_data`` is the epoch key's raw data. The
    parameters and optimizer state stay where ``layout`` puts them; XLA partitions the step and inserts the
    collectives (the all-reduce that sums the gradient, the gathers of sharded weights), so the update is the
    single-device one up to the order of the sums.
    """
    if is_stateful(net):
        update = make_stateful_step(stateful_gradient_function(net, loss, grad), optimizer)
    else:
        stateless = make_step(gradient_function(net, loss, grad), optimizer)

        def update(params, opt_state, state, x, y, optimizer_key=None, **extra):
            params, opt_state, value = stateless(params, opt_state, x, y, optimizer_key, **extra)
            return params, opt_state, state, value

    data_devices = 1 if layout is None else layout.mesh.shape["data"]
    if batch_size % data_devices:
        raise ValueError(f"batch_size {batch_size} must be divisible by the {data_devices} devices")
    split = (
        (lambda a: a)
        if layout is None
        else (lambda a: jax.lax.with_sharding_constraint(a, NamedSharding(layout.mesh, PartitionSpec("data"))))
    )

    def scan_steps(params, opt_state, state, batches, fetch):
        def step(carry, batch):
            x, y, step_key = fetch(batch)
            # A network with randomness (dropout) trains in training mode with a fresh key every step.
            extra = {"key": step_key, "train": True} if is_stochastic(net) else {}
            optimizer_key = jax.random.fold_in(step_key, 1)  # independent of the dropout draws
            *carry, value = update(*carry, split(x), split(y), optimizer_key, **extra)
            return tuple(carry), value

        (params, opt_state, state), values = jax.lax.scan(step, (params, opt_state, state), batches)
        return params, opt_state, state, jnp.mean(values)

    if layout is None:

        def epoch(params, opt_state, state, x, y, key):
            order = epoch_order(key, x.shape[0], batch_size)
            batches = (order, step_keys(key, order.shape[0]))
            return scan_steps(params, opt_state, state, batches, lambda b: (x[b[0]], y[b[0]], b[1]))

        return jax.jit(epoch, donate_argnums=(0, 1, 2))

    def sharded_epoch(params, opt_state, state, xs, ys, key_data):
        keys = step_keys(jax.random.wrap_key_data(key_data), xs.shape[0])
        return scan_steps(params, opt_state, state, (xs, ys, keys), lambda b: b)

    everywhere = layout.replicated
    return jax.jit(
        sharded_epoch,
        donate_argnums=(0, 1, 2),
        in_shardings=(layout.params, layout.opt_state, everywhere, layout.batches, layout.batches, everywhere),
        out_shardings=(layout.params, layout.opt_state, everywhere, everywhere),
    )


def layout_memory(
    net: Layer,
    loss: losses.Loss,
    optimizer: optax.GradientTransformation,
    params: Params,
    example: Any,
    batch_size: int,
    *,
    devices: int,
    layout: str = "replicated",
    model_devices: int = 1,
) -> dict[str, Any]:
    """What one device holds for a training step under ``layout``, compiled, never run: a one-step epoch is lowered
    with abstract inputs laid out as :func:`fit` lays them out.

    Arguments:
        example: one example (its shape and dtype: ``x_train[0]``).

    Returns:
        ``parameters`` and ``optimizer_state`` (bytes of this device's shards), ``batch`` (its share of
        ``batch_size`` examples and labels), and XLA's memory analysis of the compiled step
        (:func:`mnet.check.compiled_memory`: ``argument_bytes``, ``temp_bytes``, ``peak_bytes``, per device).
    """
    from mnet.check import compiled_memory

    mesh = sharding.make_mesh(devices, model_devices)
    opt_state = jax.eval_shape(optimizer.init, params)
    plan = Layout.build(mesh, net, params, opt_state, layout)
    example = np.asarray(example)
    xs = jax.ShapeDtypeStruct((1, batch_size) + example.shape, example.dtype, sharding=plan.batches)
    ys = jax.ShapeDtypeStruct((1, batch_size), np.int32, sharding=plan.batches)
    key_data = jax.ShapeDtypeStruct((2,), np.uint32, sharding=plan.replicated)

    def abstract(tree: Any, where: Any) -> Any:
        return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s), tree, where)

    def held(tree: Any, where: Any) -> int:  # bytes of the shards on the mesh's first device
        return sum(
            int(np.prod(s.shard_shape(np.shape(a)))) * jnp.dtype(a.dtype).itemsize
            for a, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(where))
        )

    epoch: Any = make_epoch(net, loss, optimizer, batch_size, layout=plan)  # jitted: it has .lower
    compiled = epoch.lower(abstract(params, plan.params), abstract(opt_state, plan.opt_state), (), xs, ys, key_data)
    return {
        "parameters": held(params, plan.params),
        "optimizer_state": held(opt_state, plan.opt_state),
        "batch": held((xs, ys), (plan.batches, plan.batches)),
        **compiled_memory(compiled.compile()),
    }


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
    layout: str = "replicated",
    model_devices: int | None = None,
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
        devices: data-parallel training over this many devices (0: all; every process's devices when several
            processes have joined through :func:`mnet.distributed.initialize`, which is also the default then), the
            batch split over them; None or 1 trains on the default device.
        layout: where the parameters and the optimizer state live on those devices (:mod:`mnet.sharding`):
            ``"replicated"`` (every device holds all), ``"fsdp"`` (each weight split over the devices) or
            ``"tensor"`` (paired dense layers split column- then row-wise over ``model_devices``).
        model_devices: the tensor-parallel group size for ``layout="tensor"`` (default: all the devices); the
            batch is split over the ``devices // model_devices`` groups.

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
    if devices is None and jax.process_count() > 1:
        devices = 0  # processes that have joined train together, over all their devices
    if layout not in sharding.LAYOUTS:
        raise ValueError(f"layout must be one of {sharding.LAYOUTS}, got {layout!r}")
    if layout != "replicated" and devices is None:
        raise ValueError(f"layout {layout!r} shards the parameters over devices: pass devices= as well")
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
    check_targets(net, loss, params, jnp.asarray(data.x_train[:1], feature_dtype), data.y_train, data.y_test)
    evaluate = make_evaluate(net, loss)
    model = 1
    if layout == "tensor":
        model = model_devices or (len(jax.devices()) if devices == 0 else int(devices or 1))
    mesh = data_parallel_mesh(devices, model)
    # Evaluation reads the data from the default device, put there once.
    x_seen, y_seen = jnp.asarray(data.x_train, feature_dtype), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test, feature_dtype), jnp.asarray(data.y_test)
    x_train: Any
    y_train: Any
    if mesh is None:
        x_train, y_train = x_seen, y_seen
        run_epoch = make_epoch(net, loss, optimizer, batch_size, grad)
    else:
        # Every array of the run is a global array on the mesh; each process fills only its own devices' shards.
        plan = Layout.build(mesh, net, params, opt_state, layout)
        params, opt_state = sharding.place(params, plan.params), sharding.place(opt_state, plan.opt_state)
        state = sharding.place(state, plan.replicated)
        x_train, y_train = np.asarray(data.x_train, feature_dtype), np.asarray(data.y_train)
        run_epoch = make_epoch(net, loss, optimizer, batch_size, grad, layout=plan)
    alone = jax.process_count() == 1

    for epoch in range(start + 1, epochs + 1):
        began = time.perf_counter()
        key = epoch_key(seed, epoch)
        if mesh is None:
            inputs = (x_train, y_train, key)
        else:
            order = np.asarray(epoch_order(key, len(x_train), batch_size))
            key_data = sharding.place(np.asarray(jax.random.key_data(key)), plan.replicated)
            inputs = (plan.gather_batches(x_train, order), plan.gather_batches(y_train, order), key_data)
        new_params, new_opt_state, new_state, train_loss = run_epoch(params, opt_state, state, *inputs)
        train_loss = float(sharding.to_host(train_loss))
        if not math.isfinite(train_loss):
            kept = f"; {checkpoint_path} still holds epoch {epoch - 1}" if checkpoint_path and epoch > 1 else ""
            raise DivergenceError(f"training diverged at epoch {epoch}: the training loss is {train_loss}{kept}")
        params, opt_state, state = new_params, new_opt_state, new_state
        # Across processes the figures are computed by every process alike, from the parameters gathered whole.
        measured = (params, state) if alone else sharding.to_host((params, state))
        _, train_accuracy = evaluate(measured[0], x_seen, y_seen, measured[1])
        test_loss, test_accuracy = (
            evaluate(measured[0], x_test, y_test, measured[1]) if len(data.x_test) else (np.nan, np.nan)
        )
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
            # Process 0 writes (atomically) what every process holds alike; the barrier keeps the others from
            # running ahead of a checkpoint that is not on disk yet.
            tree = sharding.to_host(saved())
            if distributed.is_leader():
                checkpoint.save_tree(
                    checkpoint_path, tree, {"epoch": epoch, "config": config, "history": history.to_dict()}
                )
            distributed.barrier(f"mnet checkpoint epoch {epoch}")
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
