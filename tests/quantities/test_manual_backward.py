"""The custom_vjp bridge: jax.grad through with_manual_backward equals the reference, and runs the hand rules."""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import pytest

import mnet
from tests.helpers import assert_trees_close


@dataclass(frozen=True)
class CountingDense(mnet.Dense):
    """A Dense whose backward records each call, to show which rule jax.grad ran."""

    calls: list = None

    def __hash__(self):
        return id(self)

    def backward(self, params, cache, dz):
        self.calls.append(dz.shape)
        return super().backward(params, cache, dz)


@dataclass(frozen=True)
class HalvedBiasDense(mnet.Dense):
    """A deliberately wrong rule: the bias gradient is halved."""

    def backward(self, params, cache, dz):
        grads, dx = super().backward(params, cache, dz)
        return {"W": grads["W"], "b": grads["b"] / 2}, dx


def custom_objective(y):
    """Something that is not one of mnet's losses, so JAX differentiates it and mnet the network."""
    return jnp.sum(jnp.sin(y) ** 2) + jnp.mean(y**3)


@pytest.mark.parametrize("jit", [False, True])
def test_grad_through_bridge_equals_reference(jit):
    net = mnet.serial(mnet.Dense(8), mnet.Gelu(), mnet.Dense(6), mnet.Softmax(), mnet.Dense(3), mnet.Tanh())
    _, params = net.init(jax.random.key(0), (5,))
    x = jax.random.normal(jax.random.key(1), (4, 5))
    bridged = mnet.with_manual_backward(net)
    grad_fn = jax.grad(lambda p, x: custom_objective(bridged(p, x)), argnums=(0, 1))
    reference = jax.grad(lambda p, x: custom_objective(net.apply(p, x)), argnums=(0, 1))
    if jit:
        grad_fn = jax.jit(grad_fn)
    assert_trees_close(bridged(params, x), net.apply(params, x), 0)
    assert_trees_close(grad_fn(params, x), reference(params, x), 1e-12)


def test_bridge_runs_the_hand_rules():
    calls = []
    net = mnet.serial(CountingDense(4, calls=calls), mnet.Relu(), CountingDense(2, calls=calls))
    _, params = net.init(jax.random.key(0), (3,))
    x = jnp.ones((5, 3))
    jax.grad(lambda p: custom_objective(mnet.with_manual_backward(net)(p, x)))(params)
    assert calls == [(5, 2), (5, 4)]  # both backward rules, last layer first


def test_bridge_follows_a_wrong_rule_where_autodiff_would_not():
    net = mnet.serial(HalvedBiasDense(3), mnet.Tanh())
    _, params = net.init(jax.random.key(0), (2,))
    params = ({"W": params[0]["W"], "b": jnp.full((3,), 0.3)}, ())
    x = jax.random.normal(jax.random.key(2), (4, 2))
    through_bridge = jax.grad(lambda p: custom_objective(mnet.with_manual_backward(net)(p, x)))(params)
    by_autodiff = jax.grad(lambda p: custom_objective(net.apply(p, x)))(params)
    assert_trees_close(through_bridge[0]["W"], by_autodiff[0]["W"], 1e-12)
    assert_trees_close(through_bridge[0]["b"], by_autodiff[0]["b"] / 2, 1e-12)


def test_bridge_plugs_into_optax_style_loss():
    net = mnet.serial(mnet.Dense(4), mnet.Sigmoid(), mnet.Dense(3))
    _, params = net.init(jax.random.key(0), (6,))
    x, labels = jax.random.normal(jax.random.key(1), (8, 6)), jnp.arange(8) % 3
    loss = mnet.losses.softmax_cross_entropy
    via_bridge = jax.value_and_grad(lambda p: loss.value(mnet.with_manual_backward(net)(p, x), labels))(params)
    assert_trees_close(via_bridge, mnet.value_and_grad(net, loss)(params, x, labels), 1e-12)
