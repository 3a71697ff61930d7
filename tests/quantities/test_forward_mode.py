"""Forward mode by hand and the curvature-vector products, against autodiff references: ``jax.jvp`` of the network,
``jax.jvp`` of ``jax.grad`` (Hessian-vector), ``jax.jvp`` then ``jax.vjp`` through the loss's Hessian (GGN-vector),
a dense ``jax.hessian`` on a tiny network, and float64 finite differences in ``compare_jvp``. Every layer kind,
seeded random architectures, the identities the issue names, no autodiff on the hand path, and clear refusals."""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import mnet
from mnet.errors import LayerError
from tests.cases import random_network
from tests.helpers import assert_trees_close, no_autodiff, random_targets

CE, MSE, BCE = mnet.losses.softmax_cross_entropy, mnet.losses.mse, mnet.losses.sigmoid_binary_cross_entropy

EVERY_KIND = [  # (network, example shape, integer inputs): together, every built-in layer and combinator
    (
        mnet.serial(
            mnet.Dense(5),
            mnet.Tanh(),
            mnet.Dense(4),
            mnet.Gelu(),
            mnet.Dense(4),
            mnet.Softplus(),
            mnet.Dense(4),
            mnet.Elu(),
            mnet.LeakyRelu(0.1),
            mnet.Sigmoid(),
            mnet.Dense(4),
            mnet.Relu(),
            mnet.Gelu(approximate=True),
            mnet.Identity(),
            mnet.Softmax(),
            mnet.Dense(3),
        ),
        (4,),
        False,
    ),
    (
        mnet.serial(
            mnet.Reshape((5, 5, 1)),
            mnet.Conv2D(3, 3, stride=2, padding="SAME"),
            mnet.Elu(),
            mnet.MaxPool2D(2, stride=1),
            mnet.AvgPool2D(2, padding=1, count_include_pad=False),
            mnet.Tanh(),
            mnet.Flatten(),
            mnet.Dense(3),
        ),
        (25,),
        False,
    ),
    (
        mnet.serial(
            mnet.parallel(mnet.Dense(3), mnet.serial(mnet.Dense(2), mnet.Tanh()), combine="concat"),
            mnet.Sigmoid(),
            mnet.residual(mnet.serial(mnet.Dense(5), mnet.Softplus(), mnet.Dense(5))),
            mnet.parallel(mnet.Dense(3), mnet.serial(mnet.Tanh(), mnet.Dense(3)), combine="sum"),
            mnet.LayerNorm(),
            mnet.Dense(3),
        ),
        (4,),
        False,
    ),
    (
        mnet.serial(
            mnet.Embedding(6, 4),
            mnet.MultiHeadSelfAttention(2, causal=True),
            mnet.Gelu(),
            mnet.LayerNorm(),
            mnet.residual(mnet.MultiHeadSelfAttention(2, head_dim=3)),
            mnet.Flatten(),
            mnet.Dense(3),
        ),
        (5,),
        True,
    ),
    (
        mnet.serial(mnet.Dense(4), mnet.parallel(mnet.Identity(), mnet.Dense(2)), mnet.Tanh(), mnet.Dense(3)),
        (3,),
        False,
    ),
]
NAMES = ["activations", "cnn", "combinators", "transformer", "parallel-identity"]


def problem(net, shape, ids, seed, loss=CE, batch=3):
    rng = np.random.default_rng(seed)
    _, params = net.init(jax.random.key(seed), shape, jnp.float64)
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape)), params)
    x = jnp.asarray(rng.integers(0, 6, (batch,) + shape)) if ids else jnp.asarray(rng.normal(size=(batch,) + shape))
    outputs = jax.eval_shape(net.apply, params, x)
    dparams = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
    dx = None if ids else jnp.asarray(rng.normal(size=x.shape))
    return params, x, random_targets(rng, loss, outputs.shape, jnp.float64), dparams, dx


def reference_jvp(net, params, x, dparams, dx):
    if dx is None:
        return jax.jvp(lambda p: net.apply(p, x), (params,), (dparams,))
    return jax.jvp(net.apply, (params, x), (dparams, dx))


def reference_hvp(net, loss, params, x, targets, v):
    return jax.jvp(jax.grad(lambda p: loss.value(net.apply(p, x), targets)), (params,), (v,))[1]


def reference_gvp(net, loss, params, x, targets, v):
    outputs, output_tangent = jax.jvp(lambda p: net.apply(p, x), (params,), (v,))
    curved = jax.jvp(jax.grad(lambda o: loss.value(o, targets)), (outputs,), (output_tangent,))[1]
    return jax.vjp(lambda p: net.apply(p, x), params)[1](curved)[0]


@pytest.mark.parametrize("index", range(len(EVERY_KIND)), ids=NAMES)
def test_jvp_and_curvature_products_of_every_layer_kind_equal_autodiff(index):
    net, shape, ids = EVERY_KIND[index]
    loss = [CE, MSE, BCE][index % 3]
    params, x, targets, v, dx = problem(net, shape, ids, index, loss)

    def both(params, v, dx):  # hand and reference in one compilation
        hand = (
            mnet.jvp(net)(params, x, v, dx),
            mnet.jvp(net)(params, x, v),
            mnet.ggn_vector_product(net, loss)(params, x, targets, v),
            mnet.hessian_vector_product(net, loss)(params, x, targets, v),
        )
        reference = (
            reference_jvp(net, params, x, v, dx),
            reference_jvp(net, params, x, v, None),
            reference_gvp(net, loss, params, x, targets, v),
            reference_hvp(net, loss, params, x, targets, v),
        )
        return hand, reference

    (jvp_dx, jvp_fixed, ggn_v, h_v), (ref_dx, ref_fixed, ref_ggn_v, ref_h_v) = jax.jit(both)(params, v, dx)
    assert_trees_close(jvp_dx, ref_dx, 1e-10, tree_scale=True)  # with an input tangent (none for token ids)
    assert_trees_close(jvp_fixed, ref_fixed, 1e-10, tree_scale=True)  # with the input held fixed
    assert_trees_close(ggn_v, ref_ggn_v, 1e-9, tree_scale=True)
    assert_trees_close(h_v, ref_h_v, 1e-9, tree_scale=True)


def test_jvp_and_products_on_random_architectures():
    rng = np.random.default_rng(14)
    for trial in range(4):
        net, loss = random_network(rng), [CE, MSE, BCE][trial % 3]
        params, x, targets, v, dx = problem(net, (3,), False, trial, loss, batch=4)

        def both(params, v, dx, net=net, loss=loss, x=x, targets=targets):  # hand and reference in one compilation
            hand = (
                mnet.jvp(net)(params, x, v, dx),
                mnet.hessian_vector_product(net, loss)(params, x, targets, v),
                mnet.ggn_vector_product(net, loss)(params, x, targets, v),
            )
            return hand, (
                reference_jvp(net, params, x, v, dx),
                reference_hvp(net, loss, params, x, targets, v),
                reference_gvp(net, loss, params, x, targets, v),
            )

        got, expected = jax.jit(both)(params, v, dx)
        assert_trees_close(got, expected, 1e-9, tree_scale=True)


def test_products_against_dense_matrices_on_a_tiny_network():
    """``H v`` against ``jax.hessian`` as a matrix; the GGN's quadratic form is never negative; and the GGN-vector
    product with every unit vector recovers ``diag_ggn``."""
    net = mnet.serial(mnet.Dense(3), mnet.Tanh(), mnet.Dense(2), mnet.Sigmoid(), mnet.Dense(3))
    params, x, targets, v, _ = problem(net, (2,), False, 7, CE, batch=4)
    flat, unravel = ravel_pytree(params)
    H = jax.jit(jax.hessian(lambda f: CE.value(net.apply(unravel(f), x), targets)))(flat)
    hvp, gvp = mnet.hessian_vector_product(net, CE), mnet.ggn_vector_product(net, CE)
    np.testing.assert_allclose(
        ravel_pytree(jax.jit(hvp)(params, x, targets, v))[0],
        H @ ravel_pytree(v)[0],
        rtol=1e-10,
        atol=1e-12 * np.abs(H).max(),
    )
    columns = jax.jit(jax.vmap(lambda e: ravel_pytree(gvp(params, x, targets, unravel(e)))[0]))(jnp.eye(flat.size))
    np.testing.assert_allclose(columns, columns.T, atol=1e-14)  # symmetric
    np.testing.assert_allclose(
        jnp.diag(columns), ravel_pytree(mnet.diag_ggn(net, CE)(params, x, targets))[0], rtol=1e-10, atol=1e-15
    )
    assert np.linalg.eigvalsh(np.asarray(H)).min() < -1e-6  # the Hessian here is indefinite ...
    directions = jnp.asarray(np.random.default_rng(0).normal(size=(20, flat.size)))
    quadratic = jax.jit(jax.vmap(lambda d: d @ ravel_pytree(gvp(params, x, targets, unravel(d)))[0]))(directions)
    assert quadratic.min() >= 0  # ... the GGN is not


def test_loss_hessian_vector_against_jax_hessian():
    rng = np.random.default_rng(3)
    outputs = jnp.asarray(rng.normal(size=(4, 3)))
    v = jnp.asarray(rng.normal(size=outputs.shape))
    for loss in (CE, MSE, BCE):
        targets = random_targets(rng, loss, outputs.shape, jnp.float64)
        H = jax.hessian(lambda o: loss.value(o, targets))(outputs)  # noqa: B023 (called at once, in this iteration)
        expected = jnp.einsum("bkcl,cl->bk", H, v)
        np.testing.assert_allclose(loss.hessian_vector(outputs, targets, v), expected, rtol=1e-12, atol=1e-15)
        # the default from the Hessian's square root, which a user's loss with hessian_sqrt inherits
        np.testing.assert_allclose(
            mnet.losses.Loss.hessian_vector(loss, outputs, targets, v), expected, rtol=1e-12, atol=1e-15
        )


def test_float32_jvp_and_products_within_float32_tolerance():
    net, shape, _ = EVERY_KIND[2]
    params, x, targets, v, dx = problem(net, shape, False, 1, MSE)
    as32 = lambda tree: jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), tree)  # noqa: E731
    p32, x32, t32, v32, dx32 = as32((params, x, targets, v, dx))
    assert_trees_close(
        mnet.jvp(net)(p32, x32, v32, dx32), as32(reference_jvp(net, params, x, v, dx)), 2e-5, tree_scale=True
    )
    assert_trees_close(
        mnet.hessian_vector_product(net, MSE)(p32, x32, t32, v32),
        as32(reference_hvp(net, MSE, params, x, targets, v)),
        5e-5,
        tree_scale=True,
    )


def test_dropout_tangent_uses_the_forward_mask():
    net = mnet.serial(mnet.Dense(6), mnet.Dropout(0.5), mnet.Tanh(), mnet.Dense(2))
    params, x, _, dparams, dx = problem(net, (3,), False, 5)
    key = jax.random.key(9)
    got = mnet.jvp(net)(params, x, dparams, dx, key=key, train=True)
    expected = jax.jvp(lambda p, i: net.apply(p, i, key=key, train=True), (params, x), (dparams, dx))
    assert_trees_close(got, expected, 1e-12, tree_scale=True)


def test_no_autodiff_in_jvp_and_products():
    net, shape, ids = EVERY_KIND[3]
    params, x, targets, v, _ = problem(net, shape, ids, 3)
    expected = (
        reference_jvp(net, params, x, v, None),
        reference_gvp(net, CE, params, x, targets, v),
        reference_hvp(net, CE, params, x, targets, v),
    )
    with no_autodiff():
        got = jax.jit(
            lambda p, v: (
                mnet.jvp(net)(p, x, v),
                mnet.ggn_vector_product(net, CE)(p, x, targets, v),
                mnet.hessian_vector_product(net, CE)(p, x, targets, v),
            )
        )(params, v)
    assert_trees_close(got, expected, 1e-9, tree_scale=True)


@dataclass(frozen=True)
class Doubler:
    """A user's layer with a forward and backward rule but no tangent rule."""

    def init(self, key, input_shape):
        return input_shape, ()

    def forward(self, params, x):
        return 2 * x, ()

    def backward(self, params, cache, dy):
        return (), 2 * dy


@dataclass(frozen=True, repr=False)
class WrongTangent(mnet.Dense):
    def tangent(self, params, x, dparams, dx):
        return 1.01 * super().tangent(params, x, dparams, dx)


def test_compare_jvp_agrees_and_names_a_wrong_tangent_rule():
    net = mnet.serial(mnet.Dense(4), mnet.Tanh(), mnet.Dense(3))
    params, x, _, dparams, dx = problem(net, (3,), False, 2)
    report = mnet.compare_jvp(net, params, x, dparams, dx, finite_differences=True)
    assert report.ok and "tangents agree" in str(report), str(report)
    assert report.rows[0].finite_differences.max_rel_error < 1e-7
    assert [layer.position for layer in report.layers] == ["[0]", "[1]", "[2]"]
    wrong = mnet.serial(mnet.Dense(4), mnet.Tanh(), WrongTangent(3))
    report = mnet.compare_jvp(wrong, params, x, dparams, dx, finite_differences=True)
    assert not report.ok and report.first_wrong_layer.position == "[2]"
    assert "its tangent disagrees with jax.jvp" in str(report)
    assert not report.rows[0].finite_differences.ok and report.rows[0].autodiff_vs_finite_differences.ok


def test_missing_rules_are_refused_by_name():
    net = mnet.serial(mnet.Dense(3), Doubler(), mnet.Dense(2))
    params, x, targets, v, dx = problem(net, (3,), False, 4)
    with pytest.raises(LayerError, match=r"Doubler\(\) at position \[1\].*tangent\(params, cache, dparams, dx\)"):
        mnet.jvp(net)(params, x, v, dx)
    report = mnet.check_layer(Doubler(), (3,))
    rules = {row.rule: row for row in report.rows}
    assert rules["tangent"].source == "absent" and rules["backward_tangent"].source == "absent" and report.ok
    with pytest.raises(ValueError, match="structure of params"):
        mnet.jvp(mnet.Dense(2))({"W": jnp.ones((3, 2)), "b": jnp.ones(2)}, x, {"W": jnp.ones((3, 2))}, None)
