"""MultiHeadSelfAttention and Embedding: forwards against independent JAX implementations, backwards against
jax.vjp in float64 with random shapes, heads and masks; a transformer block with every derivative function and
the no-autodiff guard; bad configurations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mnet
from mnet.errors import LayerError
from tests.helpers import assert_trees_close, check_all, check_value_and_grad, random_params, reference_attention


@jax.jit(static_argnums=0)
def attention_checks(layer, params, x, mask, dy):
    y, cache = layer.forward(params, x, mask=mask)
    _, vjp = jax.vjp(lambda p, x: layer.apply(p, x, mask=mask), params, x)
    return y, reference_attention(layer, params, x, mask), layer.backward(params, cache, dy), vjp(dy)


ATTENTION_CASES = [  # (layer, example shape)
    (mnet.MultiHeadSelfAttention(1), (4, 3)),
    (mnet.MultiHeadSelfAttention(2), (5, 4)),
    (mnet.MultiHeadSelfAttention(2, causal=True), (6, 4)),
    (mnet.MultiHeadSelfAttention(3, head_dim=2, out_dim=5), (3, 4)),
    (mnet.MultiHeadSelfAttention(4, head_dim=3, causal=True), (7, 2)),
]


@pytest.mark.parametrize("layer,shape", ATTENTION_CASES, ids=[repr(c[0]) for c in ATTENTION_CASES])
def test_attention_forward_and_backward_with_random_masks(layer, shape):
    rng = np.random.default_rng(len(shape) + shape[0])
    params = random_params(layer, shape, jnp.float64, rng)
    for batch, mask_kind in [(1, None), (3, "keys"), (2, "full")]:
        x = jnp.asarray(rng.normal(size=(batch, *shape)))
        length = shape[0]
        if mask_kind == "keys":  # padded sequences: the first key always valid
            mask = jnp.asarray(rng.uniform(size=(batch, 1, 1, length)) < 0.7).at[..., 0].set(True)
        elif mask_kind == "full":  # an arbitrary pattern per head, the diagonal kept
            mask = jnp.asarray(rng.uniform(size=(batch, layer.num_heads, length, length)) < 0.5) | jnp.eye(
                length, dtype=bool
            )
        else:
            mask = None
        y, expected, hand, reference = attention_checks(
            layer, params, x, mask, jnp.asarray(rng.normal(size=(batch, length, layer.out_dim or shape[1])))
        )
        np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-13)
        assert_trees_close(hand, reference, 1e-10, tree_scale=True)  # the key bias's gradient is exactly zero


def test_attention_matches_jax_dot_product_attention_in_float32():
    layer = mnet.MultiHeadSelfAttention(2, causal=True)
    _, params = layer.init(jax.random.key(0), (6, 8), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (3, 6, 8), jnp.float32)
    proj = {name: (x @ params[name]["W"] + params[name]["b"]).reshape(3, 6, 2, 4) for name in "qkv"}
    out = jax.nn.dot_product_attention(proj["q"], proj["k"], proj["v"], is_causal=True).reshape(3, 6, 8)
    assert_trees_close(layer.apply(params, x), out @ params["o"]["W"] + params["o"]["b"])


def test_key_bias_gradient_is_zero_and_fully_masked_rows_output_the_bias():
    layer = mnet.MultiHeadSelfAttention(2)
    params = random_params(layer, (4, 4), jnp.float64, np.random.default_rng(0))
    x = jax.random.normal(jax.random.key(1), (2, 4, 4), jnp.float64)
    y, cache = layer.forward(params, x)
    grads, _ = layer.backward(params, cache, jnp.ones_like(y))
    assert float(jnp.max(jnp.abs(grads["k"]["b"]))) < 1e-14 * float(jnp.max(jnp.abs(grads["k"]["W"])))
    nothing = jnp.zeros((2, 1, 4, 4), bool).at[:, :, 1:, :].set(True)  # query 0 may attend to nothing
    y = layer.apply(params, x, mask=nothing)
    np.testing.assert_allclose(y[:, 0], jnp.broadcast_to(params["o"]["b"], (2, 4)), rtol=1e-15)
    assert bool(jnp.all(jnp.isfinite(y)))


def test_embedding_forward_backward_and_repeated_ids():
    layer = mnet.Embedding(5, 3)
    params = random_params(layer, (4,), jnp.float64, np.random.default_rng(0))
    ids = jnp.array([[0, 2, 2, 4], [2, 1, 0, 2]])
    y, cache = layer.forward(params, ids)
    np.testing.assert_array_equal(y, jax.nn.one_hot(ids, 5, dtype=jnp.float64) @ params["W"])
    dy = jax.random.normal(jax.random.key(1), y.shape, jnp.float64)
    (grads, dx), (grads_ref, dx_ref) = layer.backward(params, cache, dy), jax.vjp(layer.apply, params, ids)[1](dy)
    assert_trees_close(grads, grads_ref, 1e-14)
    assert dx.dtype == dx_ref.dtype == jax.dtypes.float0 and dx.shape == ids.shape
    np.testing.assert_allclose(grads["W"][2], dy[0, 1] + dy[0, 2] + dy[1, 0] + dy[1, 3], rtol=1e-14)  # four uses add up
    np.testing.assert_array_equal(grads["W"][3], 0)


def test_embedding_backward_on_random_shapes():
    rng = np.random.default_rng(3)
    for vocab, dim, id_shape in [(1, 2, (3,)), (9, 1, (2, 5)), (4, 3, (2, 2, 3)), (50, 4, (6,))]:
        layer = mnet.Embedding(vocab, dim)
        params = random_params(layer, id_shape[1:], jnp.float64, rng)
        ids = jnp.asarray(rng.integers(0, vocab, id_shape))
        y, cache = layer.forward(params, ids)
        assert y.shape == id_shape + (dim,) == (id_shape[0],) + layer.init(jax.random.key(0), id_shape[1:])[0]
        dy = jnp.asarray(rng.normal(size=y.shape))
        assert_trees_close(layer.backward(params, cache, dy), jax.vjp(layer.apply, params, ids)[1](dy), 1e-13)


TRANSFORMER = mnet.serial(
    mnet.Embedding(7, 8),
    mnet.residual(mnet.serial(mnet.LayerNorm(), mnet.MultiHeadSelfAttention(2, causal=True))),
    mnet.residual(mnet.serial(mnet.LayerNorm(), mnet.Dense(16), mnet.Gelu(), mnet.Dropout(0.1), mnet.Dense(8))),
    mnet.LayerNorm(),
    mnet.Flatten(),
    mnet.Dense(3),
)


def transformer_problem(dtype=jnp.float64, batch=4, length=5):
    rng = np.random.default_rng(0)
    params = random_params(TRANSFORMER, (length,), dtype, rng)
    return params, jnp.asarray(rng.integers(0, 7, (batch, length))), jnp.asarray(rng.integers(0, 3, batch))


@pytest.mark.parametrize("train", [False, True])
def test_transformer_value_and_grad_against_autodiff(train):
    params, ids, y = transformer_problem()
    check_value_and_grad(
        TRANSFORMER,
        mnet.losses.softmax_cross_entropy,
        params,
        ids,
        y,
        1e-12,
        tree_scale=True,
        key=jax.random.key(2),
        train=train,
    )


def test_transformer_float32_report_and_manual_backward():
    loss = mnet.losses.softmax_cross_entropy
    params, ids, y = transformer_problem(jnp.float32)
    assert_trees_close(
        jax.jit(mnet.value_and_grad(TRANSFORMER, loss))(params, ids, y),
        jax.jit(mnet.autodiff_value_and_grad(TRANSFORMER, loss))(params, ids, y),
        tree_scale=True,
    )
    report = mnet.compare_gradients(TRANSFORMER, loss, *transformer_problem(), finite_differences=True)
    assert report.ok, report
    bridged = mnet.with_manual_backward(TRANSFORMER)
    through_bridge = jax.jit(jax.grad(lambda p: loss.value(bridged(p, ids), y)))(params)
    assert_trees_close(through_bridge, jax.jit(mnet.grad(TRANSFORMER, loss))(params, ids, y), tree_scale=True)


def test_transformer_derivatives():
    """Per-example gradients and norms (embedding by the id-equality Gram form, attention by the dense rules
    over positions), DP clipping, the Jacobian and the NTK, on integer inputs."""
    params, ids, y = transformer_problem()
    ids2 = jnp.asarray(np.random.default_rng(5).integers(0, 7, (3, 5)))
    check_all(
        (TRANSFORMER, mnet.losses.softmax_cross_entropy, params, ids, y), 1e-9, jit=True, tree_scale=True, x2=ids2
    )


def test_embedding_norms_when_the_vocabulary_is_small():
    """Many positions over few ids: the norms build the per-example tables instead of the Gram form."""
    net = mnet.serial(mnet.Embedding(3, 2), mnet.Flatten(), mnet.Dense(2))
    rng = np.random.default_rng(1)
    params = random_params(net, (6,), jnp.float64, rng)
    ids, t = jnp.asarray(rng.integers(0, 3, (4, 6))), jnp.asarray(rng.integers(0, 2, 4))
    check_all(
        (net, mnet.losses.softmax_cross_entropy, params, ids, t),
        1e-10,
        jit=True,
        x2=jnp.asarray(rng.integers(0, 3, (2, 6))),
    )


def test_bad_configurations_are_named_at_init():
    with pytest.raises(
        LayerError,
        match=r"MultiHeadSelfAttention\(3\) at position \[1\].*D = 8 \(input \(5, 8\)\) "
        r"does not divide into 3 heads",
    ):
        mnet.serial(mnet.Embedding(4, 8), mnet.MultiHeadSelfAttention(3)).init(jax.random.key(0), (5,))
    mnet.MultiHeadSelfAttention(3, head_dim=4).init(jax.random.key(0), (5, 8))  # explicit head_dim: fine
    with pytest.raises(LayerError, match=r"MultiHeadSelfAttention\(2\).*shape \(T, D\).*got \(64,\)"):
        mnet.MultiHeadSelfAttention(2).init(jax.random.key(0), (64,))
    layer = mnet.MultiHeadSelfAttention(2)
    _, params = layer.init(jax.random.key(0), (5, 4))
    with pytest.raises(LayerError, match=r"rank >= 3 \(batch, ...\), got shape \(5, 4\); add a leading batch axis"):
        layer.apply(params, jnp.ones((5, 4)))
    with pytest.raises(
        LayerError,
        match=r"padding mask \(batch, T\) = \(2, 5\) or a mask broadcastable to .* \(2, 2, 5, 5\), got bool of shape \(3, 5\)",
    ):
        layer.apply(params, jnp.ones((2, 5, 4)), mask=jnp.ones((3, 5), bool))
    with pytest.raises(
        LayerError,
        match=r"Embedding\(4, 2\) at position \[0\] of the network: expects integer ids, got float64 with shape \(2, 3\)",
    ):
        mnet.serial(mnet.Embedding(4, 2)).apply(({"W": jnp.ones((4, 2))},), jnp.ones((2, 3)))
    with pytest.raises(LayerError, match=r"ids must lie in \[0, 4\), found 4 in ids of shape \(2, 2\)"):
        mnet.Embedding(4, 2).apply({"W": jnp.ones((4, 2))}, jnp.array([[0, 1], [2, 4]]))
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        mnet.MultiHeadSelfAttention(0)


def test_fit_trains_on_token_ids():
    """Integer features stay integers through fit (a float cast would make the Embedding refuse them): a small
    attention network learns whether the first token is larger than the second."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, (512, 4)).astype(np.int32)
    y = (x[:, 0] > x[:, 1]).astype(np.int32)
    data = mnet.data.Dataset(x[:400], y[:400], x[400:], y[400:], 2, "order")
    net = mnet.serial(
        mnet.Embedding(6, 8), mnet.residual(mnet.MultiHeadSelfAttention(2)), mnet.Flatten(), mnet.Dense(2)
    )
    _, params = net.init(jax.random.key(0), (4,), jnp.float32)
    history = mnet.fit(
        net, mnet.losses.softmax_cross_entropy, params, data, epochs=30, optimizer=optax.adam(1e-2)
    ).history
    assert history.test_accuracy[-1] > 0.95
