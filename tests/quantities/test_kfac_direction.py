"""K-FAC's direction by hand against the dense form applied to the autodiff gradient (``jax.grad``, float64): random
symmetric positive definite inverses as well as the factors' own (the factored form must hold for any), MLPs whose
layers take the factored form and convolutions and attention layers where the dense form is the cheaper, a padded
sequence, the quadratic form KL clipping reads; the choice of form itself; the compiled step's flops; no autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnet
from mnet.core.sums import factored_preconditioned_gradient, tree_vdot
from mnet.quantities.kfac_direction import kfac_direction, precondition
from mnet.quantities.kronecker import is_factor_pair
from tests.helpers import assert_trees_close, no_autodiff, random_targets

CE, MSE = mnet.losses.softmax_cross_entropy, mnet.losses.mse


def random_inverses(factors, rng):
    """Random symmetric positive definite matrices shaped like every ``{"A", "G"}`` entry of ``factors``."""

    def spd(matrix):
        n = matrix.shape[0]
        root = rng.normal(size=(n, n))
        return jnp.asarray(root @ root.T / n + 0.1 * np.eye(n))

    return jax.tree_util.tree_map(
        lambda node: {k: spd(v) for k, v in node.items()} if is_factor_pair(node) else node,
        factors,
        is_leaf=lambda node: is_factor_pair(node) or node is None,
    )


def check_direction(net, loss, params, x, y, inverses, mask=None):
    """The hand-derived direction and quadratic against ``precondition`` of the autodiff gradient."""
    value, grads = jax.jit(mnet.autodiff_value_and_grad(net, loss))(params, x, y, mask=mask)
    expected = jax.jit(precondition)(inverses, grads)
    with no_autodiff():
        hand_value, direction, quadratic = jax.jit(kfac_direction(net, loss))(params, x, y, inverses, mask=mask)
    assert_trees_close(direction, expected, 1e-9)
    np.testing.assert_allclose(hand_value, value, rtol=1e-12)
    np.testing.assert_allclose(quadratic, tree_vdot(expected, grads), rtol=1e-9)


def factors_of(net, loss):
    return jax.jit(mnet.kfac_factors(net, loss))


def random_mlp(rng):
    layers, width = [], int(rng.integers(6, 12))
    for _ in range(int(rng.integers(1, 3))):
        layers += [mnet.Dense(width), [mnet.Tanh, mnet.Relu, mnet.Gelu][rng.integers(3)]()]
        if rng.integers(2):
            layers.append(mnet.LayerNorm())  # no Kronecker structure: its plain gradient
    return mnet.serial(*layers, mnet.Dense(3)), int(rng.integers(8, 14))


@pytest.mark.parametrize("seed", range(3))
def test_random_mlps_match_the_dense_form_for_any_inverses(seed):
    rng = np.random.default_rng(seed)
    net, n_in = random_mlp(rng)
    batch = int(rng.integers(1, 5))
    _, params = net.init(jax.random.key(seed), (n_in,), jnp.float64)
    x = jnp.asarray(rng.normal(size=(batch, n_in)))
    loss = [CE, MSE][seed % 2]
    y = random_targets(rng, loss, (batch, 3), jnp.float64)
    factors = factors_of(net, loss)(params, x, y)
    check_direction(net, loss, params, x, y, random_inverses(factors, rng))
    # the factors' own damped inverses, the ones K-FAC holds
    own = jax.tree_util.tree_map(
        lambda node: (
            {k: jnp.linalg.inv(v + 0.1 * jnp.eye(len(v))) for k, v in node.items()} if is_factor_pair(node) else node
        ),
        factors,
        is_leaf=lambda node: is_factor_pair(node) or node is None,
    )
    check_direction(net, loss, params, x, y, jax.tree_util.tree_map(lambda m: (m + m.T) / 2, own))


def test_positions_attention_and_a_padded_sequence():
    """A convolution's windows take the dense form, an attention layer's and a gated MLP's projections at a short
    sequence the factored one; under a padding mask the padded positions leave both."""
    rng = np.random.default_rng(5)
    conv = mnet.serial(mnet.Conv2D(2, 3, padding="SAME"), mnet.Tanh(), mnet.Flatten(), mnet.Dense(3))
    _, params = conv.init(jax.random.key(0), (4, 4, 1), jnp.float64)
    x = jnp.asarray(rng.normal(size=(2, 4, 4, 1)))
    y = jnp.asarray(rng.integers(0, 3, 2))
    check_direction(conv, CE, params, x, y, random_inverses(factors_of(conv, CE)(params, x, y), rng))
    decoder = mnet.serial(
        mnet.MultiHeadSelfAttention(2, num_kv_heads=1, causal=True), mnet.GatedMLP(9, use_bias=False), mnet.Dense(5)
    )
    _, params = decoder.init(jax.random.key(1), (3, 8), jnp.float64)
    x = jnp.asarray(rng.normal(size=(2, 3, 8)))
    y = jnp.asarray(rng.integers(0, 5, (2, 3)))
    mask = jnp.array([[True, True, True], [True, False, False]])
    inverses = random_inverses(factors_of(decoder, CE)(params, x, y, mask=mask), rng)
    check_direction(decoder, CE, params, x, y, inverses, mask=mask)
    check_direction(decoder, CE, params, x, y, inverses)


def test_a_tied_table_keeps_its_plain_gradient_and_its_cross_term():
    """A GPT whose read-out reuses the embedding: the table has no inverses, its entry is the sum of its two uses'
    gradients, and the quadratic form holds their cross term (it once counted each use alone)."""
    rng = np.random.default_rng(3)
    net = mnet.models.gpt(11, 4, 8, 1, 2, num_kv_heads=1, tie_embeddings=True)
    _, params = net.init(jax.random.key(0), (4,), jnp.float64)
    ids, y = (jnp.asarray(rng.integers(0, 11, (2, 4))) for _ in range(2))
    check_direction(net, CE, params, ids, y, random_inverses(factors_of(net, CE)(params, ids, y), rng))


def test_the_factored_form_is_taken_where_it_is_cheaper_and_is_exact():
    rng = np.random.default_rng(0)
    left, right = (jnp.asarray(m @ m.T) for m in (rng.normal(size=(7, 7)), rng.normal(size=(5, 5))))
    inputs, cotangents = jnp.asarray(rng.normal(size=(3, 7))), jnp.asarray(rng.normal(size=(3, 5)))
    direction, quadratic = factored_preconditioned_gradient(inputs, cotangents, left, right)
    gradient = inputs.T @ cotangents
    np.testing.assert_allclose(direction, left @ gradient @ right, rtol=1e-12)
    np.testing.assert_allclose(quadratic, jnp.vdot(left @ gradient @ right, gradient), rtol=1e-12)
    many = jnp.asarray(rng.normal(size=(40, 7)))  # 40 rows against widths 7 and 5: the dense form is cheaper
    assert factored_preconditioned_gradient(many, jnp.ones((40, 5)), left, right) is None


def test_the_compiled_direction_costs_a_fraction_of_the_dense_form():
    """A property of the compiled programs (XLA's cost analysis): at batch 16 against layers of 200 and 100 the
    factored direction, which never builds the gradient, needs less than half the dense form's flops."""
    net = mnet.serial(mnet.Dense(100), mnet.Relu(), mnet.Dense(100), mnet.Relu(), mnet.Dense(10))
    _, params = net.init(jax.random.key(0), (200,))
    x, y = jax.random.normal(jax.random.key(1), (16, 200)), jnp.arange(16) % 10
    inverses = random_inverses(factors_of(net, CE)(params, x, y), np.random.default_rng(0))
    grads_fn = mnet.value_and_grad(net, CE)

    def dense(p, inputs, labels, inv):
        return precondition(inv, grads_fn(p, inputs, labels)[1])

    def factored(p, inputs, labels, inv):
        return kfac_direction(net, CE)(p, inputs, labels, inv)[1]

    flops = {
        name: jax.jit(fn).lower(params, x, y, inverses).compile().cost_analysis()["flops"]
        for name, fn in (("dense", dense), ("factored", factored))
    }
    assert flops["factored"] < 0.5 * flops["dense"], flops
