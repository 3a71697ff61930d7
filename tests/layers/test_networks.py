"""Whole random networks: hand-derived value_and_grad against jax.value_and_grad, every loss, both dtypes,
jitted and not; and the shape inference of init against what apply produces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import mnet
from tests.helpers import assert_trees_close, mlp_problems


def compare(problem, jit, rtol=None):
    net, loss, params, x, targets = problem
    hand, reference = mnet.value_and_grad(net, loss), mnet.autodiff_value_and_grad(net, loss)
    if jit:
        hand, reference = jax.jit(hand), jax.jit(reference)
    value, grads = hand(params, x, targets)
    value_ref, grads_ref = reference(params, x, targets)
    assert_trees_close(value, value_ref, rtol)
    assert_trees_close(grads, grads_ref, rtol)
    return grads


@settings(max_examples=4)  # eager is slow; the jitted twin below covers more architectures
@given(mlp_problems(jnp.float64))
def test_float64_eager(problem):
    compare(problem, jit=False, rtol=1e-10)


@settings(max_examples=15)
@given(mlp_problems(jnp.float64))
def test_float64_jitted(problem):
    compare(problem, jit=True, rtol=1e-10)


@settings(max_examples=4)
@given(mlp_problems(jnp.float32))
def test_float32_eager(problem):
    grads = compare(problem, jit=False)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(grads))


@settings(max_examples=15)
@given(mlp_problems(jnp.float32))
def test_float32_jitted(problem):
    compare(problem, jit=True)


@pytest.mark.parametrize("loss", [mnet.losses.mse, mnet.losses.softmax_cross_entropy])
def test_hand_picked_digits_sized_mlp(loss):
    """A realistic case beside the random ones: 64-128-64-10 with ReLU at batch 32."""
    net = mnet.serial(mnet.Dense(128), mnet.Relu(), mnet.Dense(64), mnet.Relu(), mnet.Dense(10))
    _, params = net.init(jax.random.key(0), (64,), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (32, 64), jnp.float64)
    targets = jnp.arange(32) % 10 if loss is mnet.losses.softmax_cross_entropy else jnp.ones((32, 10))
    compare((net, loss, params, x, targets), jit=True, rtol=1e-12)


def test_grad_is_the_second_half_of_value_and_grad():
    net = mnet.serial(mnet.Dense(3), mnet.Sigmoid(), mnet.Dense(2))
    _, params = net.init(jax.random.key(0), (4,))
    x, t = jnp.ones((5, 4)), jnp.zeros((5, 2))
    assert_trees_close(
        mnet.grad(net, mnet.losses.mse)(params, x, t), mnet.value_and_grad(net, mnet.losses.mse)(params, x, t)[1], 0
    )


@given(mlp_problems(jnp.float64))
def test_init_shape_equals_apply_shape(problem):
    net, _, params, x, _ = problem
    out_shape, _ = net.init(jax.random.key(0), x.shape[1:])
    assert net.apply(params, x).shape == (x.shape[0], *out_shape)


def test_init_shape_with_flatten_and_multi_axis_inputs():
    net = mnet.serial(mnet.Dense(5), mnet.Relu(), mnet.Flatten(), mnet.Dense(2))
    out_shape, params = net.init(jax.random.key(0), (3, 4, 6))
    y = net.apply(params, jnp.ones((7, 3, 4, 6)))
    assert out_shape == (2,) and y.shape == (7, 2)
    assert params[2] == () and params[0]["W"].shape == (6, 5) and params[3]["W"].shape == (60, 2)


def test_dtype_follows_params_and_inputs():
    net = mnet.serial(mnet.Dense(3), mnet.Gelu(), mnet.Dense(2))
    for dtype in (jnp.float32, jnp.float64):
        _, params = net.init(jax.random.key(0), (4,), dtype)
        value, grads = mnet.value_and_grad(net, mnet.losses.mse)(
            params, jnp.ones((2, 4), dtype), jnp.ones((2, 2), dtype)
        )
        assert value.dtype == dtype and {g.dtype for g in jax.tree_util.tree_leaves(grads)} == {np.dtype(dtype)}
