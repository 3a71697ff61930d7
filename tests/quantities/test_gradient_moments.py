"""``sum_grad_squared`` and ``gradient_variance``: the moments of the per-example gradients equal those of
``vmap(jax.grad)``'s per-example gradients, on hand-picked networks (convolution, attention with a padding mask,
an embedding) and random ones, without autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnet
from tests.cases import random_network
from tests.helpers import assert_trees_close, no_autodiff, random_targets
from tests.quantities.test_masks import encoder, padded_batch
from tests.quantities.test_second_order import HAND_PICKED, problem

CE, MSE, BCE = mnet.losses.softmax_cross_entropy, mnet.losses.mse, mnet.losses.sigmoid_binary_cross_entropy


def reference_moments(net, loss, params, x, targets, mask=None):
    """``(sum_b g_b^2, mean_b g_b^2 - (mean_b g_b)^2)`` from autodiff's per-example gradients."""

    def one(p, x_b, t_b, m_b):
        kept = None if m_b is None else m_b[None]
        masked, t = mnet.losses.with_mask(loss, t_b[None], kept)
        return masked.value(net.apply(p, x_b[None], mask=kept), t)

    grads = jax.vmap(jax.grad(one), in_axes=(None, 0, 0, 0))(params, x, targets, mask)
    squares = jax.tree_util.tree_map(lambda g: jnp.sum(g * g, 0), grads)
    variance = jax.tree_util.tree_map(lambda g: jnp.var(g, 0), grads)
    return squares, variance


def check(net, loss, params, x, targets, mask=None):
    expected_squares, expected_variance = jax.jit(lambda p: reference_moments(net, loss, p, x, targets, mask))(params)
    with no_autodiff():
        squares = jax.jit(mnet.sum_grad_squared(net, loss))(params, x, targets, mask=mask)
        variance = jax.jit(mnet.gradient_variance(net, loss))(params, x, targets, mask=mask)
    assert_trees_close(squares, expected_squares, 1e-10, tree_scale=True)
    assert_trees_close(variance, expected_variance, 1e-9, tree_scale=True)


@pytest.mark.parametrize("index, loss", [(0, CE), (1, MSE), (2, BCE), (3, CE)])
def test_moments_equal_autodiffs_per_example_gradients(index, loss):
    net, shape = HAND_PICKED[index]
    params, x, targets = problem(net, shape, loss, index, batch=4, ids=index == 3)
    check(net, loss, params, x, targets)


def test_moments_on_random_architectures():
    for seed in range(3):
        rng = np.random.default_rng(seed)
        net = random_network(rng)
        loss = [CE, MSE, BCE][seed]
        _, params = net.init(jax.random.key(seed), (3,), jnp.float64)
        x = jnp.asarray(rng.normal(size=(5, 3)))
        check(net, loss, params, x, random_targets(rng, loss, (5, 3), jnp.float64))


def test_moments_leave_padding_out():
    net = encoder()
    ids, targets, mask = padded_batch()
    _, params = net.init(jax.random.key(0), ids.shape[1:], jnp.float64)
    check(net, CE, params, ids, targets, mask)


def test_the_variance_of_equal_gradients_is_zero():
    """Every example the same: the variance is exactly zero (clipped where rounding leaves it a hair below), and the
    sum of squares is the batch times one example's."""
    net = mnet.serial(mnet.Dense(4), mnet.Tanh(), mnet.Dense(3))
    params, x, targets = problem(net, (5,), CE, 0, batch=1)
    x, targets = jnp.repeat(x, 6, 0), jnp.repeat(targets, 6, 0)
    variance = mnet.gradient_variance(net, CE)(params, x, targets)
    assert all(float(jnp.min(v)) >= 0 and float(jnp.max(v)) < 1e-15 for v in jax.tree_util.tree_leaves(variance))
    single = mnet.sum_grad_squared(net, CE)(params, x[:1], targets[:1])
    assert_trees_close(
        mnet.sum_grad_squared(net, CE)(params, x, targets), jax.tree_util.tree_map(lambda s: 6 * s, single), 1e-12
    )
