"""from_flax: a Flax NNX model becomes an mnet network with the same outputs and the same gradients as nnx.grad of
the Flax model (float64, 1e-10), for every mapped layer; an unmapped layer is refused by name."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnet
from mnet.interop import UnsupportedLayer, from_flax
from tests.helpers import assert_trees_close, no_autodiff

nnx = pytest.importorskip("flax.nnx", reason="the Flax bridge needs flax (pip install mnet[bridges])")
flax_attention = pytest.importorskip("flax.nnx.nn.attention")
F64 = {"param_dtype": jnp.float64, "dtype": jnp.float64}


def mlp(rngs):
    return nnx.Sequential(
        nnx.Linear(5, 7, rngs=rngs, **F64),
        nnx.relu,
        nnx.LayerNorm(7, rngs=rngs, **F64),
        nnx.Linear(7, 6, use_bias=False, rngs=rngs, **F64),
        nnx.Sequential(functools.partial(nnx.gelu, approximate=False), nnx.tanh, nnx.silu),
        nnx.RMSNorm(6, epsilon=1e-5, rngs=rngs, **F64),
        nnx.Dropout(0.5, deterministic=True),
        nnx.Linear(6, 3, rngs=rngs, **F64),
        nnx.softmax,
    )


def cnn(rngs):
    return nnx.Sequential(
        nnx.Conv(2, 3, (3, 3), rngs=rngs, **F64),  # padding "SAME", Flax's default
        nnx.relu,
        functools.partial(nnx.max_pool, window_shape=(2, 2), strides=(2, 2)),
        nnx.Conv(3, 4, (3, 2), strides=(2, 1), padding=((1, 1), (0, 0)), rngs=rngs, **F64),
        nnx.sigmoid,
        functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(1, 1), padding=((1, 1), (1, 1))),
        lambda x: x.reshape(x.shape[0], -1),
        nnx.Linear(3 * 4 * 4, 5, rngs=rngs, **F64),
    )


def exact_attention(query, key, value, mask=None, **options):
    """Flax's own attention weights and product. Flax's default ``nnx.dot_product_attention`` is off by 1e-7 in
    float64 (measured against these pieces and against NumPy: it goes through ``jax.nn.dot_product_attention``,
    which computes in lower precision), so the float64 reference is built from the exact parts."""
    weights = flax_attention.dot_product_attention_weights(query, key, mask=mask)
    return jnp.einsum("...hqk,...khd->...qhd", weights, value)


def attention(rngs):
    return nnx.Sequential(
        nnx.Linear(3, 8, rngs=rngs, **F64),
        nnx.MultiHeadAttention(2, 8, decode=False, attention_fn=exact_attention, rngs=rngs, **F64),
        nnx.softplus,
        nnx.Linear(8, 2, rngs=rngs, **F64),
    )


CASES = {"mlp": (mlp, (3, 5)), "cnn": (cnn, (3, 8, 8, 2)), "attention": (attention, (2, 4, 3))}


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_equal_the_flax_models(case):
    build, shape = CASES[case]
    model = build(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), shape)
    y = model(x)
    cotangent = jax.random.normal(jax.random.key(2), y.shape)
    grads = nnx.grad(lambda m: jnp.sum(m(x) * cotangent))(model)
    x_grad = jax.grad(lambda xs: jnp.sum(model(xs) * cotangent))(x)

    net, params = from_flax(model)
    with no_autodiff():
        out, cache = net.forward(params, x)
        dparams, dx = net.backward(params, cache, cotangent)
    np.testing.assert_allclose(out, y, rtol=1e-10, atol=1e-12)
    # The conversion is linear in every weight: the model holding its gradients, converted, is the gradient.
    holding = nnx.clone(model)
    nnx.update(holding, grads)
    # A key bias adds the same score to every key of a query: its gradient is zero, in both to rounding, so
    # the attention case is compared relative to the whole tree's scale.
    assert_trees_close(dparams, from_flax(holding)[1], 1e-10, tree_scale=case == "attention")
    np.testing.assert_allclose(dx, x_grad, rtol=1e-10, atol=1e-12)


def test_a_flax_cnns_per_example_norms_are_mnets():
    model = cnn(nnx.Rngs(3))
    net, params = from_flax(model)
    x, labels = jax.random.normal(jax.random.key(4), (4, 8, 8, 2)), jnp.arange(4) % 5
    loss = mnet.losses.softmax_cross_entropy
    norms = mnet.per_example_grad_norms(net, loss)(params, x, labels)
    graphdef, state = nnx.split(model)
    one = lambda s, xb, tb: loss.value(nnx.merge(graphdef, s)(xb[None]), tb[None])  # noqa: E731
    per = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(state, x, labels)
    expected = jnp.sqrt(sum(jnp.sum(leaf.reshape(4, -1) ** 2, axis=1) for leaf in jax.tree_util.tree_leaves(per)))
    np.testing.assert_allclose(norms, expected, rtol=1e-10)
    assert repr(net).startswith("serial(Conv2D(3, (3, 3), padding='SAME')")  # Flax's layout is mnet's: no transposes


def test_token_ids_go_through_an_embedding_and_its_gradient_is_flaxs():
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Embed(9, 4, rngs=rngs, **F64), nnx.Linear(4, 3, rngs=rngs, **F64))
    ids = jnp.arange(12).reshape(2, 6) % 9
    cotangent = jax.random.normal(jax.random.key(2), (2, 6, 3))
    net, params = from_flax(model)
    out, cache = net.forward(params, ids)
    np.testing.assert_allclose(out, model(ids), rtol=1e-12)
    holding = nnx.clone(model)
    nnx.update(holding, nnx.grad(lambda m: jnp.sum(m(ids) * cotangent))(model))
    assert_trees_close(net.backward(params, cache, cotangent)[0], from_flax(holding)[1], 1e-10)


@pytest.mark.parametrize(
    "module, message",
    [
        (lambda r: nnx.Sequential(nnx.Linear(2, 2, rngs=r), nnx.relu6), r"at model.layers\[1\].*'relu6' is not mapped"),
        (lambda r: nnx.Conv(2, 2, (3, 3), kernel_dilation=2, rngs=r), r"flax.Conv at model.*without dilation"),
        (lambda r: nnx.Sequential(nnx.BatchNorm(3, rngs=r)), r"flax.BatchNorm at model.layers\[0\]"),
        (lambda r: nnx.MultiHeadAttention(2, 4, normalize_qk=True, decode=False, rngs=r), "normalize_qk"),
    ],
)
def test_an_unmapped_layer_is_named_with_its_position(module, message):
    with pytest.raises(UnsupportedLayer, match=message):
        from_flax(module(nnx.Rngs(0)))
