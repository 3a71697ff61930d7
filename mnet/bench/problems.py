"""The benchmark problems (an MLP, a CNN, a transformer) and the contenders of a training step: hand-derived and
autodiff gradients side by side.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mnet import models
from mnet.bench.timing import interleaved_medians
from mnet.checking.reference import autodiff_value_and_grad
from mnet.core.protocol import LayerProtocol as Layer
from mnet.core.protocol import apply_layer
from mnet.losses import softmax_cross_entropy
from mnet.models import mlp
from mnet.quantities.gradient import value_and_grad
from mnet.training.steps import make_step


def mlp_problem(widths: list[int], batch: int, seed: int = 0, dtype=jnp.float32, compute_dtype: str | None = None):
    """An MLP of ``widths`` (ReLU between layers) with its parameters, a random normal batch and integer labels;
    products in ``compute_dtype`` when given (mixed precision)."""
    net = mlp(widths[1:], compute_dtype=compute_dtype)
    _, params = net.init(jax.random.key(seed), (widths[0],), dtype)
    x = jax.random.normal(jax.random.key(seed + 1), (batch, widths[0]), dtype)
    labels = jax.random.randint(jax.random.key(seed + 2), (batch,), 0, widths[-1])
    return net, params, x, labels


def weights(widths: list[int]) -> int:
    return sum(a * b for a, b in zip(widths, widths[1:]))


def cnn_problem(batch: int) -> tuple[Any, Any, jax.Array, jax.Array]:
    """:func:`mnet.models.digits_cnn` with its parameters, a random batch of flat 8x8 images and labels."""
    net = models.digits_cnn()
    _, params = net.init(jax.random.key(0), (64,), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (batch, 64), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    return net, params, x, y


def transformer_problem(batch: int, length: int) -> tuple[Any, Any, jax.Array, jax.Array]:
    """:func:`mnet.models.transformer_classifier` (one block, width 32, 4 heads, 16 tokens and classes) with its
    parameters, random token ids and labels."""
    net = models.transformer_classifier(vocab=16, classes=16)
    _, params = net.init(jax.random.key(0), (length,), jnp.float32)
    ids = jax.random.randint(jax.random.key(1), (batch, length), 0, 16)
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 16)
    return net, params, ids, y


def train_step(grad_fn, lr: float = 1e-2):
    optimizer = optax.sgd(lr)
    return optimizer, make_step(grad_fn, optimizer)


def hand_and_autodiff(net: Layer) -> dict[str, Callable]:
    """The two gradient functions every training row compares, by their contender names."""
    return {
        "hand": value_and_grad(net, softmax_cross_entropy),
        "jax.grad": autodiff_value_and_grad(net, softmax_cross_entropy),
    }


def vmapped_autodiff_grads(net: Layer):
    """The reference for per-example work: ``jax.grad`` of each example's loss, vmapped over the batch."""
    one = lambda p, xb, yb: softmax_cross_entropy.value(apply_layer(net, p, xb[None]), yb[None])  # noqa: E731
    return jax.vmap(jax.grad(one), in_axes=(None, 0, 0))


def step_contenders(net: Layer, params, x, y) -> dict[str, Callable[[], object]]:
    """One jitted SGD training step of ``net`` on ``(x, y)`` (softmax cross-entropy) per gradient path,
    hand-derived and ``jax.grad``, each as a call with no arguments (compiled on first call)."""
    contenders: dict[str, Callable[[], object]] = {}
    for label, grad_fn in hand_and_autodiff(net).items():
        optimizer, step = train_step(grad_fn)
        jitted = jax.jit(step)
        state = optimizer.init(params)
        contenders[label] = functools.partial(jitted, params, state, x, y)
    return contenders


def step_seconds(net: Layer, params, x, y, rounds: int) -> dict[str, float]:
    """Median seconds of :func:`step_contenders`, interleaved."""
    return interleaved_medians(step_contenders(net, params, x, y), rounds)


def describe_step_seconds(seconds: dict[str, float], batch: int, rounds: int) -> str:
    """One line for the experiments: the :func:`step_seconds` of both contenders and their ratio."""
    return (
        f"time per SGD step, batch {batch} (median of {rounds} interleaved samples on {jax.devices()[0].device_kind}): "
        + ", ".join(f"{name} {s * 1e3:.3f} ms" for name, s in seconds.items())
        + f"; hand / jax.grad = {seconds['hand'] / seconds['jax.grad']:.2f}"
    )
