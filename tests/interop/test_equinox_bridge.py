"""from_equinox: an Equinox model becomes an mnet network computing jax.vmap(model), with the same outputs and the
same gradients as jax.grad of the Equinox model (float64, 1e-10), for every mapped layer; an unmapped layer is
refused by name."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnet
from mnet.interop import UnsupportedLayer, from_equinox
from tests.helpers import assert_trees_close, no_autodiff

eqx = pytest.importorskip("equinox", reason="the Equinox bridge needs equinox (pip install mnet[bridges])")
nn = eqx.nn


def mlp(key):
    k = jax.random.split(key, 4)
    return nn.Sequential(
        [
            nn.Linear(5, 7, key=k[0]),
            nn.Lambda(jax.nn.relu),
            nn.LayerNorm(7),
            nn.MLP(7, 6, 8, 2, activation=jax.nn.tanh, final_activation=jax.nn.silu, key=k[1]),
            nn.Lambda(functools.partial(jax.nn.gelu, approximate=False)),
            nn.Lambda(jax.nn.gelu),
            nn.Lambda(functools.partial(jax.nn.leaky_relu, negative_slope=0.2)),
            nn.Lambda(jax.nn.elu),
            nn.RMSNorm(6, use_bias=False),
            nn.RMSNorm(6, eps=1e-4),  # Equinox's default: with a shift
            nn.Identity(),
            nn.Dropout(0.2, inference=True),
            nn.Linear(6, 4, use_bias=False, key=k[2]),
            nn.MLP(4, 3, 5, 1, key=k[3]),
            nn.Lambda(jax.nn.softmax),
        ]
    )


def cnn(key):
    k = jax.random.split(key, 3)
    return nn.Sequential(
        [
            nn.Conv2d(2, 3, 3, padding=1, key=k[0]),
            nn.Lambda(jax.nn.relu),
            nn.MaxPool2d(2, stride=2),
            nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=((1, 1), (0, 0)), key=k[1]),
            nn.Lambda(jax.nn.sigmoid),
            nn.AvgPool2d(2, stride=1, padding=1),
            nn.Lambda(jnp.ravel),
            nn.Linear(4 * 3 * 4, 5, key=k[2]),
        ]
    )


def attention(key):
    k = jax.random.split(key, 3)
    return nn.Sequential(
        [
            nn.Linear(3, 8, key=k[0]),
            nn.MultiheadAttention(2, 8, use_query_bias=True, use_output_bias=True, key=k[1]),
            nn.Lambda(jax.nn.softplus),
            nn.Linear(8, 2, key=k[2]),
        ]
    )


def self_attention_model(model):
    """The Equinox model as a user writes it: the attention layer called on ``(x, x, x)`` in a loop over layers."""

    def apply(x):
        for layer in model.layers:
            x = layer(x, x, x) if isinstance(layer, nn.MultiheadAttention) else jax.vmap(layer)(x)
        return x

    return apply


def perturbed(model):
    """The model in float64 with every array moved off its initial value (norms' unit scales and zero shifts
    included), so that each weight shows in the outputs."""
    arrays, rest = eqx.partition(model, eqx.is_array)
    leaves, treedef = jax.tree_util.tree_flatten(arrays)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    moved = [leaf.astype(jnp.float64) + 0.1 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, moved), rest)


def without_kv_biases(params):
    attention = {name: dict(p) for name, p in params[1].items()}
    for name in "kv":
        del attention[name]["b"]
    return params[:1] + (attention,) + params[2:]


CASES = {
    "mlp": (mlp, (3, 5), lambda m: m),
    "cnn": (cnn, (3, 2, 8, 8), lambda m: m),
    "attention": (attention, (2, 4, 3), self_attention_model),
}


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_equal_the_equinox_models(case):
    build, shape, as_function = CASES[case]
    model = perturbed(build(jax.random.key(0)))
    x = jax.random.normal(jax.random.key(1), shape)
    y = jax.vmap(as_function(model))(x)
    cotangent = jax.random.normal(jax.random.key(2), y.shape)
    model_grads = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(as_function(m))(x) * cotangent))(model)
    x_grad = jax.grad(lambda xs: jnp.sum(jax.vmap(as_function(model))(xs) * cotangent))(x)

    net, params = from_equinox(model)
    with no_autodiff():
        out, cache = net.forward(params, x)
        dparams, dx = net.backward(params, cache, cotangent)
    np.testing.assert_allclose(out, y, rtol=1e-10, atol=1e-12)
    # The conversion is linear in every weight: the gradient module (its functions put back) converted is the
    # gradient in mnet's layout.
    expected = from_equinox(eqx.combine(model_grads, model))[1]
    if case == "attention":  # the key and value biases the Equinox layer lacks are mnet's zeros: not the source's
        dparams, expected = (without_kv_biases(tree) for tree in (dparams, expected))
    assert_trees_close(dparams, expected, 1e-10)
    np.testing.assert_allclose(dx, x_grad, rtol=1e-10, atol=1e-12)


def test_token_ids_go_through_an_embedding_and_its_gradient_is_equinoxs():
    layers = [nn.Embedding(9, 4, key=jax.random.key(0)), nn.LayerNorm(4), nn.Linear(4, 3, key=jax.random.key(1))]
    model = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if eqx.is_array(a) else a, nn.Sequential(layers))
    ids = jnp.arange(6) % 9
    cotangent = jax.random.normal(jax.random.key(2), (6, 3))
    net, params = from_equinox(model)
    out, cache = net.forward(params, ids)
    np.testing.assert_allclose(out, jax.vmap(model)(ids), rtol=1e-12)
    grads = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(ids) * cotangent))(model)
    assert_trees_close(net.backward(params, cache, cotangent)[0], from_equinox(eqx.combine(grads, model))[1], 1e-10)


def test_an_equinox_mlps_gradient_is_mnets_hand_derived_one():
    model = nn.MLP(4, 3, 6, 2, key=jax.random.key(0))
    net, params = from_equinox(model, dtype=jnp.float64)
    x, labels = jax.random.normal(jax.random.key(1), (8, 4)), jnp.arange(8) % 3
    loss = mnet.losses.softmax_cross_entropy
    grads = mnet.grad(net, loss)(params, x, labels)
    model = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if eqx.is_array(a) else a, model)
    reference = eqx.filter_grad(lambda m: loss.value(jax.vmap(m)(x), labels))(model)
    assert_trees_close(grads, from_equinox(eqx.combine(reference, model))[1], 1e-10)


@pytest.mark.parametrize(
    "module, message",
    [
        (nn.Sequential([nn.Lambda(jax.nn.relu6)]), r"equinox.Lambda at model.layers\[0\].*'relu6' is not mapped"),
        (nn.Sequential([nn.LayerNorm((2, 4))]), r"equinox.LayerNorm at model.layers\[0\].*only the last axis"),
        (nn.Conv2d(2, 2, 3, dilation=2, key=jax.random.key(0)), r"equinox.Conv2d at model.*dilation=1"),
        (nn.Sequential([nn.GRUCell(2, 3, key=jax.random.key(0))]), r"equinox.GRUCell at model.layers\[0\]"),
    ],
)
def test_an_unmapped_layer_is_named_with_its_position(module, message):
    with pytest.raises(UnsupportedLayer, match=message):
        from_equinox(module)
