"""Every layer's hand-derived backward against jax.vjp of its apply, float64, relative error below 1e-10."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mnet
from tests.helpers import ACTIVATIONS, abstract_init, assert_trees_close, random_params

LAYER_CASES = [
    *ACTIVATIONS,
    mnet.Dense(5),
    mnet.Dense(1),
    mnet.Dense(3, use_bias=False),
    mnet.Flatten(),
    mnet.serial(mnet.Dense(4), mnet.Tanh(), mnet.Dense(2)),
    mnet.serial(),
    mnet.LayerNorm(),
    mnet.Dropout(0.3),  # deterministic call: the identity, whose backward must be too
    mnet.residual(mnet.serial(mnet.LayerNorm(), mnet.Tanh())),  # shape-preserving for any example shape
    mnet.parallel(mnet.Dense(2), mnet.serial(mnet.Dense(3), mnet.Sigmoid()), mnet.Identity()),
    mnet.parallel(mnet.Dense(4), mnet.serial(mnet.LayerNorm(), mnet.Dense(4)), combine="sum"),
]


def check_layer_against_vjp(layer, example_shape, batch, seed, rtol=1e-10):
    rng = np.random.default_rng(seed)
    out_shape, _ = abstract_init(layer, example_shape, jnp.float64)
    params = random_params(layer, example_shape, jnp.float64, rng)
    x = jnp.asarray(2.0 * rng.normal(size=(batch, *example_shape)))
    y, cache = layer.forward(params, x)
    assert y.shape == (batch, *out_shape)
    dy = jnp.asarray(rng.normal(size=y.shape))
    dparams, dx = layer.backward(params, cache, dy)
    y_ref, vjp = jax.vjp(layer.apply, params, x)
    dparams_ref, dx_ref = vjp(dy)
    np.testing.assert_allclose(y, y_ref, rtol=1e-14, atol=0)
    assert_trees_close(dparams, dparams_ref, rtol)
    assert_trees_close(dx, dx_ref, rtol)


@pytest.mark.parametrize("layer", LAYER_CASES, ids=repr)
@settings(max_examples=10)
@given(
    example_shape=st.sampled_from([(1,), (6,), (2, 3), (3, 1, 2)]),
    batch=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**30),
)
def test_backward_equals_vjp(layer, example_shape, batch, seed):
    check_layer_against_vjp(layer, example_shape, batch, seed)


@pytest.mark.parametrize("layer", ACTIVATIONS, ids=repr)
def test_activation_backward_at_large_inputs(layer):
    """Saturated regions (|z| up to 60) are where a careless formula overflows or loses the derivative."""
    z = jnp.linspace(-60.0, 60.0, 241)[None, :] + 0.125  # off the kinks at 0, where one-sided rules differ
    dy = jnp.cos(jnp.arange(241.0))[None, :]
    _, cache = layer.forward((), z)
    _, dz = layer.backward((), cache, dy)
    _, vjp = jax.vjp(layer.apply, (), z)
    assert bool(jnp.all(jnp.isfinite(dz)))
    assert_trees_close(dz, vjp(dy)[1], 1e-10)


def test_layers_are_hashable_and_immutable():
    for layer in LAYER_CASES + [
        mnet.Conv2D(3, 2, padding="SAME"),
        mnet.MaxPool2D(2),
        mnet.AvgPool2D(3, 1),
        mnet.MultiHeadSelfAttention(2, causal=True),
        mnet.Embedding(5, 2),
        mnet.Reshape((2, 3)),
    ]:
        assert hash(layer) == hash(layer)
        with pytest.raises(AttributeError):
            layer.extra = 1
    assert mnet.Dense(3) == mnet.Dense(3) and mnet.Dense(3) != mnet.Dense(4)
    assert {mnet.LeakyRelu(0.2), mnet.LeakyRelu(0.2)} == {mnet.LeakyRelu(0.2)}
    assert mnet.Conv2D(3, 2) == mnet.Conv2D(3, (2, 2), 1, "valid")  # normalised hyperparameters compare equal


def test_layer_as_static_jit_argument():
    @jax.jit
    def run(params, x):
        return mnet.value_and_grad(net, mnet.losses.mse)(params, x, jnp.zeros((2, 3)))

    net = mnet.serial(mnet.Dense(3), mnet.Tanh())
    run_static = jax.jit(lambda layer, p, x: layer.apply(p, x), static_argnums=0)
    _, params = net.init(jax.random.key(0), (4,))
    x = jnp.ones((2, 4))
    np.testing.assert_allclose(run_static(net, params, x), net.apply(params, x), rtol=1e-15)
    assert run(params, x)[0].shape == ()


@pytest.mark.parametrize(
    "name", ["glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_uniform", "lecun_normal"]
)
def test_initializer_variances(name):
    """Empirical variance of a large draw against the formula in mnet.initializers."""
    fan_in, fan_out = 400, 600
    W = mnet.initializers.get(name)(jax.random.key(3), (fan_in, fan_out), jnp.float64)
    expected = {"glorot": 2 / (fan_in + fan_out), "he": 2 / fan_in, "lecun": 1 / fan_in}[name.split("_")[0]]
    assert abs(float(jnp.mean(W))) < 0.01 * np.sqrt(expected) * 10
    assert abs(float(jnp.var(W)) / expected - 1) < 0.02
    if name.endswith("uniform"):
        assert float(jnp.max(jnp.abs(W))) <= np.sqrt(3 * expected)


def test_dense_initializer_choice_and_zero_bias():
    _, params = mnet.Dense(7, W_init="normal").init(jax.random.key(0), (300,))
    assert abs(float(jnp.std(params["W"])) - 0.01) < 0.001
    assert not jnp.any(params["b"])
    _, params = mnet.Dense(7, W_init=mnet.initializers.Normal(2.0), b_init="ones").init(jax.random.key(0), (300,))
    assert abs(float(jnp.std(params["W"])) - 2.0) < 0.2 and jnp.all(params["b"] == 1)
    with pytest.raises(ValueError, match="unknown initializer 'glorious'"):
        mnet.Dense(3, W_init="glorious")


def test_relu_keeps_nan_as_jax_nn_relu_does():
    """Defect 3: ReLU mapped NaN to 0, so a network whose parameters had gone NaN could return a finite loss."""
    z = jnp.asarray([-1.0, 0.0, 2.0, jnp.nan, -jnp.inf, jnp.inf])
    y, cache = mnet.Relu().forward((), z)
    np.testing.assert_array_equal(y, jax.nn.relu(z))
    _, dz = mnet.Relu().backward((), cache, jnp.ones_like(z))
    np.testing.assert_array_equal(dz, jax.grad(lambda a: jnp.sum(jax.nn.relu(a)))(z))
