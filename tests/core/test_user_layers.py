"""Users' own layers are first-class: a duck-typed layer (no mnet.Layer base, init without dtype) works in every
combinator, every derivative, compare_gradients, with_manual_backward and fit; check_layer passes every built-in
layer and names the rule of a wrong one."""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mnet
from mnet import train
from mnet.training import data
from tests.cases import DECODER_LAYERS, GLU, LAYERS, USER_NETWORKS, GatedLinearUnit
from tests.helpers import assert_trees_close, check_all, check_value_and_grad, reference_per_example_grads


def problem(net, dtype=jnp.float64, batch=5):
    _, params = net.init(jax.random.key(0), (4,), dtype)
    params = jax.tree_util.tree_map(lambda p: p + 0.05, params)
    x = jax.random.normal(jax.random.key(1), (batch, 4), dtype)
    return net, mnet.losses.softmax_cross_entropy, params, x, jnp.arange(batch) % 3


def test_init_without_dtype_follows_the_requested_dtype():
    _, params = USER_NETWORKS["serial"].init(jax.random.key(0), (4,), jnp.float64)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float64)}
    _, params = USER_NETWORKS["serial"].init(jax.random.key(0), (4,), jnp.float32)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("name", USER_NETWORKS)
def test_duck_typed_layer_everywhere(name):
    net, loss, params, x, targets = problem(USER_NETWORKS[name])
    check_value_and_grad(net, loss, params, x, targets, 1e-12)
    report = mnet.compare_gradients(net, loss, params, x, targets)
    assert report.ok, str(report)
    assert any("GatedLinearUnit" in layer.layer for layer in report.layers)
    if name != "serial":  # the serial case is the parallel one's first branch; its derivatives are covered there
        check_all((net, loss, params, x, targets), 1e-10, jit=True)
    y, vjp = jax.vjp(mnet.with_manual_backward(net), params, x)
    assert_trees_close(
        vjp(jnp.ones_like(y)),
        jax.vjp(lambda p, inputs: net.forward(p, inputs)[0], params, x)[1](jnp.ones_like(y)),
        1e-12,
    )


def test_fit_trains_a_duck_typed_layer():
    full = data.load_digits(0)
    dataset = data.Dataset(full.x_train[:256], full.y_train[:256], full.x_test[:64], full.y_test[:64], 10, "digits")
    net = mnet.serial(GatedLinearUnit(32), mnet.Dense(10))
    _, params = net.init(jax.random.key(0), (64,))
    runs = {
        grad: train.fit(
            net,
            mnet.losses.softmax_cross_entropy,
            params,
            dataset,
            optimizer=optax.adam(1e-2),
            epochs=4,
            batch_size=32,
            grad=grad,
        )
        for grad in ("manual", "autodiff")
    }
    history = runs["manual"].history
    assert history.train_loss[-1] < 0.3 * history.train_loss[0] and history.test_accuracy[-1] > 0.8
    assert_trees_close(runs["manual"].params, runs["autodiff"].params, 1e-4)


def test_non_layers_are_refused_clearly():
    with pytest.raises(TypeError, match=r"serial: argument 1 is .*not a layer \(a layer has init"):
        mnet.serial(mnet.Dense(2), object())
    with pytest.raises(TypeError, match="parallel: argument 0 .*forget the parentheses"):
        mnet.parallel(mnet.Relu)
    with pytest.raises(TypeError, match="residual: the block"):
        mnet.residual(lambda x: x)
    with pytest.raises(TypeError, match="check_layer"):
        mnet.check_layer(42, (3,))


@pytest.mark.parametrize("layer, shape", LAYERS, ids=[repr(layer)[:40] for layer, _ in LAYERS])
def test_check_layer_passes_every_built_in_layer(layer, shape):
    report = mnet.check_layer(layer, shape, batch=3)
    assert report.ok, str(report)
    rules = {row.rule: row for row in report.rows}
    assert {
        "init",
        "backward",
        "per_example_backward",
        "per_example_sq_norms",
        "ntk_contribution",
        "tangent",
        "backward_tangent",
    } <= set(rules)
    if layer is not GLU:  # every built-in layer has forward mode and a Hessian-vector rule (own, walk or default)
        assert rules["tangent"].source != "absent" and rules["backward_tangent"].source != "absent", str(report)
    for row in report.rows:
        if row.agreement is not None and row.rule != "init":
            a = row.agreement  # leaves that are zero in exact arithmetic (attention's key bias) by the whole scale
            assert min(a.max_rel_error, a.max_abs_error / max(a.global_scale, 1e-300)) < 1e-11, str(report)
    if any(layer is decoder for decoder, _ in DECODER_LAYERS):  # their second-order rules are compared, not skipped
        assert rules["diag_hessian"].agreement is not None, str(report)
    has_params = bool(jax.tree_util.tree_leaves(mnet.core.init_layer(layer, jax.random.key(0), shape)[1]))
    if layer is GLU:
        assert rules["per_example_backward"].source == "absent" and "one example at a time" in str(report)
    elif not has_params:
        assert rules["ntk_contribution"].source in ("default", "walk")
    assert report.to_dict()["ok"] is True


@dataclass(frozen=True, repr=False)
class WrongBackward(mnet.Dense):
    def backward(self, params, x, dz):
        grads, dx = super().backward(params, x, dz)
        return grads, 1.01 * dx


@dataclass(frozen=True, repr=False)
class WrongPerExample(mnet.Dense):
    def per_example_backward(self, params, x, dz):
        grads, dx = super().per_example_backward(params, x, dz)
        return {"W": grads["W"], "b": grads["b"][::-1]}, dx


@dataclass(frozen=True, repr=False)
class WrongNTK(mnet.Dense):
    def ntk_contribution(self, params, x1, x2, dzs1, dzs2):
        return super().ntk_contribution(params, x1, x2, dzs1, dzs2) + 1e-3


@dataclass(frozen=True, repr=False)
class WrongDiagHessian(mnet.Dense):
    def diag_hessian(self, params, x, curvature):
        share, below = super().diag_hessian(params, x, curvature)
        return {"W": 1.01 * share["W"], "b": share["b"]}, below


@dataclass(frozen=True, repr=False)
class WrongKronecker(mnet.Dense):
    def kronecker_factors(self, params, x, S):
        factors = super().kronecker_factors(params, x, S)
        return {"A": factors["A"], "G": factors["G"] + 1e-3 * jnp.eye(factors["G"].shape[0], dtype=factors["G"].dtype)}


@dataclass(frozen=True, repr=False)
class WrongBackwardTangent(mnet.Dense):
    def backward_tangent(self, params, cache, tangents, dy, dy_tangent):
        hv, dx, dx_tangent = super().backward_tangent(params, cache, tangents, dy, dy_tangent)
        return jax.tree_util.tree_map(lambda g: 1.01 * g, hv), dx, dx_tangent


@pytest.mark.parametrize(
    "layer, rule",
    [
        (WrongBackward(3), "backward"),
        (WrongPerExample(3), "per_example_backward"),
        (WrongNTK(3), "ntk_contribution"),
        (WrongDiagHessian(3), "diag_hessian"),
        (WrongKronecker(3), "kronecker_factors"),
        (WrongBackwardTangent(3), "backward_tangent"),
    ],
)
def test_check_layer_names_the_wrong_rule(layer, rule):
    report = mnet.check_layer(layer, (4,))
    # A wrong backward also makes the Hessian-vector rule built on it wrong, and the check says so after it.
    expected = [rule, "backward_tangent"] if rule == "backward" else [rule]
    assert not report.ok and report.wrong == expected
    assert f"DISAGREES with autodiff: {', '.join(expected)}" in str(report) and "MISMATCH" in str(report)
    assert report.to_dict()["wrong"] == expected
    # Inside a network, the walk carries the wrong rule along and the check names the same rule.
    assert rule in mnet.check_layer(mnet.serial(mnet.Tanh(), layer, mnet.Relu()), (4,)).wrong


def test_per_example_rules_follow_the_policy():
    """Under a bfloat16 policy, backward and the per-example rules return the same input-gradient dtype, and the
    per-example gradients sum to the batch gradient."""
    layer = mnet.Dense(8, policy=mnet.Policy("bfloat16"))
    _, params = layer.init(jax.random.key(0), (5,), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (4, 5), jnp.float32)
    y, cache = layer.forward(params, x)
    dy = jax.random.normal(jax.random.key(2), y.shape, y.dtype)
    grads, dx = layer.backward(params, cache, dy)
    per, dx_per = layer.per_example_backward(params, cache, dy)
    sq, dx_sq = layer.per_example_sq_norms(params, cache, dy)
    assert dx.dtype == dx_per.dtype == dx_sq.dtype == jnp.bfloat16
    assert per["W"].dtype == grads["W"].dtype == jnp.float32
    assert_trees_close(jax.tree_util.tree_map(lambda g: g.sum(0), per), grads, 1e-2)
    np.testing.assert_allclose(sq, (per["W"] ** 2).sum((1, 2)) + (per["b"] ** 2).sum(1), rtol=1e-2)


class PerExampleGradientSum(mnet.core.Quantity):
    """A quantity mnet does not have, defined here with a default only: each example's sum of the entries of its
    gradient, leaf by leaf. No combinator or composite layer knows of it, yet the walk carries it through all."""

    rule = "per_example_gradient_sum"

    def default(self, layer, params, caches, carried):
        grads, down = mnet.quantities.per_example.PER_EXAMPLE_BACKWARD.at_unit(layer, params, caches, carried)
        if not jax.tree_util.tree_leaves(params):
            return (), down
        return jax.tree_util.tree_map(lambda g: g.reshape(g.shape[0], -1).sum(1), grads), down


@dataclass(frozen=True, repr=False)
class DenseWithOwnSum(mnet.Dense):
    """A layer that overrides the new quantity's rule: the walk must use it."""

    def per_example_gradient_sum(self, params, x, dz):
        grads, dx = self.per_example_backward(params, x, dz)
        return jax.tree_util.tree_map(lambda g: -g.reshape(g.shape[0], -1).sum(1), grads), dx


@pytest.mark.parametrize(
    "net, x",
    [
        (
            mnet.serial(
                mnet.Reshape((6, 6, 1)),
                mnet.Conv2D(2, 3, padding="SAME"),
                mnet.Relu(),
                mnet.MaxPool2D(2),
                mnet.Flatten(),
                mnet.residual(mnet.serial(mnet.Dense(18), mnet.Tanh())),
                mnet.parallel(mnet.Dense(2), mnet.Elu()),
                mnet.Dense(3),
            ),
            jax.random.normal(jax.random.key(3), (4, 36)),
        ),
        (
            mnet.serial(
                mnet.Embedding(5, 4),
                mnet.residual(mnet.MultiHeadSelfAttention(2)),
                mnet.LayerNorm(),
                mnet.Flatten(),
                mnet.Dense(3),
            ),
            jax.random.randint(jax.random.key(3), (4, 3), 0, 5),
        ),
    ],
    ids=["cnn-residual-parallel", "attention"],
)
def test_a_new_quantity_needs_no_combinator_change(net, x):
    _, params = net.init(jax.random.key(0), x.shape[1:], jnp.float64)
    outputs = net.forward(params, x)[0]
    cotangents = jax.random.normal(jax.random.key(4), outputs.shape, outputs.dtype)
    sums = jax.jit(lambda p, dy: PerExampleGradientSum().run(net, p, net.forward(p, x)[1], dy)[0])(params, cotangents)

    def one(p, x_b, dy_b):  # the reference: each example's own vjp
        return jax.vjp(lambda q: net.forward(q, x_b[None])[0], p)[1](dy_b[None])[0]

    per_example = jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))(params, x, cotangents)
    reference = jax.tree_util.tree_map(lambda g: g.reshape(g.shape[0], -1).sum(1), per_example)
    assert_trees_close(sums, reference, 1e-10, tree_scale=True)  # attention's key bias is zero in exact arithmetic


def test_a_layers_own_rule_for_a_new_quantity_is_used():
    net = mnet.serial(mnet.Dense(4), mnet.Tanh(), DenseWithOwnSum(2))
    _, params = net.init(jax.random.key(0), (3,), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (5, 3))
    outputs, cache = net.forward(params, x)
    sums, _ = PerExampleGradientSum().run(net, params, cache, jnp.ones_like(outputs))
    per, _ = mnet.quantities.per_example.PER_EXAMPLE_BACKWARD.run(net, params, cache, jnp.ones_like(outputs))
    np.testing.assert_allclose(sums[2]["W"], -per[2]["W"].sum((1, 2)), rtol=1e-12)
    np.testing.assert_allclose(sums[0]["W"], per[0]["W"].sum((1, 2)), rtol=1e-12)


@dataclass
class MutableScale:
    """A user's layer that is not even hashable (a dataclass without frozen=True): ``y = x * s``."""

    def init(self, key, input_shape):
        return tuple(input_shape), {"s": jnp.linspace(0.5, 1.5, input_shape[-1])}

    def forward(self, params, x):
        return x * params["s"], x

    def backward(self, params, x, dy):
        return {"s": jnp.sum(x * dy, axis=0)}, dy * params["s"]


def test_an_unhashable_user_layer_works_too():
    net = mnet.serial(mnet.Dense(4), MutableScale(), mnet.Dense(3))
    report = mnet.compare_gradients(*problem(net))
    assert report.ok and [row.layer for row in report.layers][1] == "MutableScale()", str(report)
    assert mnet.check_layer(MutableScale(), (4,)).ok
    net, loss, params, x, targets = problem(net)
    expected = jax.jit(lambda p: reference_per_example_grads(net, loss, p, x, targets))(params)
    assert_trees_close(jax.jit(mnet.per_example_grads(net, loss))(params, x, targets), expected, 1e-10)
