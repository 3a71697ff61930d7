"""Where an epoch's arrays live: the device mesh, the order of the examples, and the shardings of the parameters,
the optimizer state and the batches (:class:`Layout`), and the jitted epoch built on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mnet import losses
from mnet.compiled import compiled_memory
from mnet.core.protocol import LayerProtocol as Layer
from mnet.core.protocol import Params, is_stateful, is_stochastic
from mnet.errors import SettingError
from mnet.optim.accounting import poisson_capacity
from mnet.training import sharding
from mnet.training.sampling import poisson_batch
from mnet.training.steps import gradient_function, make_stateful_step, make_step, stateful_gradient_function


def data_parallel_mesh(devices: int | None, model: int = 1) -> Mesh | None:
    """A ``("data", "model")`` mesh over the first ``devices`` devices (all of them for 0, every process's once
    :func:`mnet.distributed.initialize` has run), ``model`` per tensor-parallel group; None for plain
    single-device training (see :func:`mnet.training.sharding.make_mesh`)."""
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
    split over ``"data"``) as shardings, everything else replicated (see :mod:`mnet.training.sharding`)."""

    mesh: Mesh
    params: Any
    opt_state: Any

    @classmethod
    def build(cls, mesh: Mesh, net: Layer, params: Params, opt_state: Any, layout: str, example: Any) -> Layout:
        """``example``: one batch of inputs, or its ``jax.ShapeDtypeStruct`` (the tensor layout walks the network)."""
        specs = sharding.parameter_specs(net, params, layout, mesh, example)
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


def rows(targets: Any, indices: jax.Array) -> Any:
    """The rows ``indices`` of the targets: labels, or the pair ``(labels, mask)``."""
    return jax.tree_util.tree_map(lambda a: a[indices], targets)


def make_epoch(
    net: Layer,
    loss: losses.Loss,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    grad: str | Callable = "manual",
    layout: Layout | None = None,
    sampling: str = "shuffle",
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

    ``sampling="poisson"`` (one device): each of the epoch's ``examples // batch_size`` steps draws its own Poisson
    batch (:mod:`mnet.training.sampling`), and the gradient function gets ``included=`` and ``expected_batch=``,
    the optimizer ``expected_batch=``.

    ``y`` may be the pair ``(labels, mask)`` (padded sequences, ``mask`` ``(examples, T)``): each batch's mask rows
    go to the gradient function and the optimizer as ``mask=``.
    """
    if is_stateful(net):
        update = make_stateful_step(stateful_gradient_function(net, loss, grad), optimizer)
    else:
        stateless = make_step(
            # K-FAC may then compute the hand-derived gradient's direction in factored form; a user who asked for
            # autodiff's gradient, or gave a function of their own, gets their gradient preconditioned as it is.
            gradient_function(net, loss, grad),
            optimizer,
            batch_gradient=grad == "manual",
        )

        def update(params, opt_state, state, x, y, optimizer_key=None, **extra):
            if isinstance(y, tuple):  # padded sequences: (labels, mask), the mask for the gradient and the optimizer
                y, extra = y[0], {**extra, "mask": y[1]}
            params, opt_state, value = stateless(params, opt_state, x, y, optimizer_key, **extra)
            return params, opt_state, state, value

    data_devices = 1 if layout is None else layout.mesh.shape["data"]
    if batch_size % data_devices:
        raise SettingError(f"batch_size {batch_size} must be divisible by the {data_devices} devices")
    split = (
        (lambda a: a)
        if layout is None
        else (lambda a: jax.lax.with_sharding_constraint(a, NamedSharding(layout.mesh, PartitionSpec("data"))))
    )

    def scan_steps(params, opt_state, state, batches, fetch):
        """``fetch(batch) -> (x, y, step_key, sampled)``; ``sampled`` is what a Poisson batch adds (its weights)."""

        def step(carry, batch):
            x, y, step_key, sampled = fetch(batch)
            # A network with randomness (dropout) trains in training mode with a fresh key every step.
            extra = {"key": step_key, "train": True} if is_stochastic(net) else {}
            optimizer_key = jax.random.fold_in(step_key, 1)  # independent of the dropout draws
            *carry, value = update(
                *carry, split(x), jax.tree_util.tree_map(split, y), optimizer_key, **sampled, **extra
            )
            return tuple(carry), value

        (params, opt_state, state), values = jax.lax.scan(step, (params, opt_state, state), batches)
        return params, opt_state, state, jnp.mean(values)

    if sampling == "poisson":

        def poisson_epoch(params, opt_state, state, x, y, key):
            examples, steps = x.shape[0], x.shape[0] // batch_size
            capacity = poisson_capacity(examples, batch_size)

            def fetch(batch):
                indices, included = poisson_batch(batch[0], examples, batch_size, capacity)
                return x[indices], rows(y, indices), batch[1], {"included": included, "expected_batch": batch_size}

            draws = jax.random.split(jax.random.split(key)[0], steps)
            return scan_steps(params, opt_state, state, (draws, step_keys(key, steps)), fetch)

        return jax.jit(poisson_epoch, donate_argnums=(0, 1, 2))

    if layout is None:

        def epoch(params, opt_state, state, x, y, key):
            order = epoch_order(key, x.shape[0], batch_size)
            batches = (order, step_keys(key, order.shape[0]))
            return scan_steps(params, opt_state, state, batches, lambda b: (x[b[0]], rows(y, b[0]), b[1], {}))

        return jax.jit(epoch, donate_argnums=(0, 1, 2))

    def sharded_epoch(params, opt_state, state, xs, ys, key_data):
        keys = step_keys(jax.random.wrap_key_data(key_data), xs.shape[0])
        return scan_steps(params, opt_state, state, (xs, ys, keys), lambda b: (*b, {}))

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
        (:func:`mnet.compiled.compiled_memory`: ``argument_bytes``, ``temp_bytes``, ``peak_bytes``, per device).
    """

    mesh = sharding.make_mesh(devices, model_devices)
    opt_state = jax.eval_shape(optimizer.init, params)
    example = np.asarray(example)
    plan = Layout.build(mesh, net, params, opt_state, layout, jax.ShapeDtypeStruct((1,) + example.shape, example.dtype))
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
