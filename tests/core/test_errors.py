"""Bad input at the public boundary: a clear error naming the layer, its position and the shapes."""

import jax
import jax.numpy as jnp
import pytest

import mnet
from mnet.errors import LayerError

NET = mnet.serial(mnet.Dense(8), mnet.Relu(), mnet.serial(mnet.Dense(4), mnet.Tanh()), mnet.Dense(2))
_, PARAMS = NET.init(jax.random.key(0), (5,))


def test_wrong_input_width():
    with pytest.raises(
        LayerError,
        match=r"^Dense\(8\) at position \[0\] of the network: expects input width 5 "
        r"\(W is \(5, 8\)\), got input of shape \(3, 7\)$",
    ):
        NET.apply(PARAMS, jnp.ones((3, 7)))


def test_missing_batch_axis():
    with pytest.raises(LayerError, match=r"Dense\(8\) at position \[0\].*rank >= 2.*got shape \(5,\).*x\[None\]"):
        NET.apply(PARAMS, jnp.ones(5))


def test_non_floating_input():
    with pytest.raises(LayerError, match=r"at position \[0\].*floating-point input, got dtype int"):
        mnet.value_and_grad(NET, mnet.losses.mse)(PARAMS, jnp.ones((3, 5), int), jnp.ones((3, 2)))


def test_params_of_another_network():
    _, other = mnet.serial(mnet.Dense(8), mnet.Relu(), mnet.serial(mnet.Dense(3), mnet.Tanh()), mnet.Dense(2)).init(
        jax.random.key(0), (5,)
    )
    with pytest.raises(LayerError, match=r"^Dense\(4\) at position \[2\]\[0\].*W of shape \(n_in, 4\), got \(8, 3\)"):
        NET.apply(other, jnp.ones((3, 5)))
    with pytest.raises(LayerError, match=r"expects a tuple of 4 parameter entries"):
        NET.apply(PARAMS[:3], jnp.ones((3, 5)))
    with pytest.raises(LayerError, match=r"Relu\(\) at position \[1\].*has no parameters"):
        NET.apply((PARAMS[0], PARAMS[0], PARAMS[2], PARAMS[3]), jnp.ones((3, 5)))
    with pytest.raises(LayerError, match=r"Dense\(2\) at position \[3\].*keys \['W', 'b'\]"):
        NET.apply(PARAMS[:3] + ({"W": PARAMS[3]["W"]},), jnp.ones((3, 5)))


def test_errors_inside_jit_name_the_layer_too():
    with pytest.raises(LayerError, match=r"at position \[0\]"):
        jax.jit(NET.apply)(PARAMS, jnp.ones((3, 6)))


def test_bad_init_shapes_and_constructors():
    with pytest.raises(LayerError, match=r"Dense\(8\) at position \[0\].*got \(0,\)"):
        NET.init(jax.random.key(0), (0,))
    with pytest.raises(LayerError, match=r"rank >= 1"):
        NET.init(jax.random.key(0), ())
    with pytest.raises(ValueError, match="out_dim must be a positive int"):
        mnet.Dense(0)
    with pytest.raises(TypeError, match="not a layer .*parentheses"):
        mnet.serial(mnet.Dense(3), mnet.Relu)
