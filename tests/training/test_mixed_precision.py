"""Mixed precision: float32 parameters, bfloat16/float16 products with float32 accumulation, honoured by the
hand-derived rules; and training digits to the float32 accuracy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnet
from mnet.checking.agreement import tolerance
from tests.helpers import assert_trees_close

LOSS = mnet.losses.softmax_cross_entropy


@pytest.mark.parametrize("compute", ["bfloat16", "float16"])
def test_rules_keep_the_policy_dtypes(compute):
    net = mnet.mlp([32, 16, 5], "gelu", compute_dtype=compute)
    _, params = net.init(jax.random.key(0), (8,), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (6, 8), jnp.float32)
    labels = jnp.arange(6) % 5
    outputs, caches = net.forward(params, x)
    assert outputs.dtype == jnp.float32  # the last layer hands the loss float32 logits
    assert caches[0].dtype == caches[2].dtype == caches[4].dtype == jnp.dtype(compute)  # layer inputs, cached small
    value, grads = mnet.value_and_grad(net, LOSS)(params, x, labels)
    assert value.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(grads)} == {np.dtype("float32")}
    # The reference is autodiff through the very same mixed-precision forward.
    _, reference = mnet.autodiff_value_and_grad(net, LOSS)(params, x, labels)
    assert_trees_close(grads, reference, tolerance(compute))
    # And both stay close to the all-float32 gradient, to the compute dtype's precision.
    _, exact = mnet.value_and_grad(mnet.mlp([32, 16, 5], "gelu"), LOSS)(params, x, labels)
    assert_trees_close(grads, exact, 8 * tolerance(compute))


def test_products_accumulate_in_float32():
    """A sum of many bfloat16 products keeps float32 accuracy: 4096 terms of 1/256 sum to exactly 16, which a
    bfloat16 accumulator (8 bits of mantissa) would stop short of."""
    dense = mnet.Dense(1, use_bias=False, policy=mnet.Policy("bfloat16", "float32"))
    params = {"W": jnp.full((4096, 1), 1 / 256, jnp.float32)}
    z, cache = dense.forward(params, jnp.ones((2, 4096), jnp.float32))
    assert float(z[0, 0]) == 16.0
    grads, _ = dense.backward(params, cache, jnp.full((2, 1), 1 / 256, jnp.float32))
    assert grads["W"].dtype == jnp.float32 and float(grads["W"][0, 0]) == pytest.approx(2 / 256)


def test_bfloat16_trains_digits_to_the_float32_accuracy():
    dataset = mnet.data.load_digits(0)
    accuracies = {}
    for compute in (None, "bfloat16"):
        net = mnet.mlp([256, 10], compute_dtype=compute)
        _, params = net.init(jax.random.key(0), dataset.example_shape, jnp.float32)
        accuracies[compute] = mnet.fit(net, LOSS, params, dataset, epochs=40).history.test_accuracy[-1]
    assert accuracies["bfloat16"] >= 0.97
    assert abs(accuracies["bfloat16"] - accuracies[None]) <= 0.01


def test_bad_policy():
    with pytest.raises(ValueError, match="floating"):
        mnet.Policy("int8")


def test_conv2d_honours_the_policy():
    """Conv2D runs its product through Dense's policy path: bf16 products, float32 accumulation and gradients."""
    layer = mnet.Conv2D(4, 3, padding="SAME", policy=mnet.Policy("bfloat16", output_dtype="float32"))
    exact = mnet.Conv2D(4, 3, padding="SAME")
    _, params = layer.init(jax.random.key(0), (6, 6, 2), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (3, 6, 6, 2), jnp.float32)
    y, cache = layer.forward(params, x)
    grads, dx = layer.backward(params, cache, jnp.ones_like(y))
    y_exact, cache_exact = exact.forward(params, x)
    grads_exact, _ = exact.backward(params, cache_exact, jnp.ones_like(y_exact))
    assert y.dtype == grads["W"].dtype == grads["b"].dtype == jnp.float32 and dx.dtype == jnp.bfloat16
    assert_trees_close((y, grads), (y_exact, grads_exact), 2e-2)  # bf16 inputs: 8 mantissa bits
