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


def test_with_manual_tangent_runs_the_hand_tangents_and_serves_every_transformation():
    """The forward-mode twin: jax.jvp and jax.jacfwd through it equal autodiff's, run the hand tangent rules, and
    jax.grad and jax.hessian work through it too (the tangent pass is linear, so JAX can transpose it)."""
    from tests.helpers import no_autodiff

    with jax.enable_x64(True):
        net = mnet.serial(mnet.Dense(6), mnet.Tanh(), mnet.LayerNorm(), mnet.Dense(3))
        _, params = net.init(jax.random.key(0), (4,), jnp.float64)
        x = jax.random.normal(jax.random.key(1), (2, 4), jnp.float64)
        hand, reference = mnet.with_manual_tangent(net), lambda p, inputs: net.forward(p, inputs)[0]
        directions = (jax.tree_util.tree_map(jnp.ones_like, params), x)
        assert_trees_close(jax.jvp(hand, (params, x), directions), jax.jvp(reference, (params, x), directions), 1e-12)
        objective = lambda fn: lambda p: jnp.sum(jnp.sin(fn(p, x)))  # noqa: E731
        assert_trees_close(jax.grad(objective(hand))(params), jax.grad(objective(reference))(params), 1e-12)
        second = lambda fn: jax.hessian(lambda inputs: jnp.sum(fn(params, inputs) ** 2))(x)  # noqa: E731
        assert_trees_close(second(hand), second(reference), 1e-11)
        assert_trees_close(jax.jacfwd(hand, argnums=1)(params, x), jax.jacfwd(reference, argnums=1)(params, x), 1e-12)
        with no_autodiff():  # the forward-mode rule itself is the hand tangent pass
            jax.make_jaxpr(lambda p, t: apply_tangent_rule(net, p, x, t))(params, directions[0])


def apply_tangent_rule(net, params, x, dparams):
    return mnet.jvp(net)(params, x, dparams, None)


def test_an_empty_batch_is_refused_at_every_driver():
    net = mnet.mlp([4, 3])
    _, params = net.init(jax.random.key(0), (5,))
    x, y = jnp.zeros((0, 5)), jnp.zeros((0,), jnp.int32)
    loss = mnet.losses.softmax_cross_entropy
    for driver in (mnet.value_and_grad, mnet.per_example_grad_norms, mnet.per_example_grads, mnet.diag_ggn):
        with pytest.raises(mnet.LossError, match="the batch is empty \\(targets of shape \\(0,\\)\\)"):
            jax.make_jaxpr(driver(net, loss))(params, x, y)
