"""The modern decoder's layers (RMSNorm, Silu, GatedMLP, grouped-query attention with rotary positions) and
``models.gpt``: forwards against independent implementations, every rule and quantity against autodiff in float64,
planted wrong rules named, the no-autodiff guard, bad input, and float32 training against jax.grad."""

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import mnet
from mnet.checking.layer_report import perturbed
from mnet.layers.attention.heads import HeadLayout
from tests.helpers import assert_trees_close, load_experiment, no_autodiff, random_params

LOSS = mnet.losses.softmax_cross_entropy


def llama_attention(layer, params, x, mask=None):
    """Attention as Hugging Face's LLaMA writes it (rotate_half, repeat_kv), in numpy-like jnp from scratch."""
    batch, length, model = x.shape
    heads, kv_heads = layer.num_heads, layer.num_kv_heads or layer.num_heads
    d = layer.head_dim or model // heads

    def project(name, count):
        out = x @ params[name]["W"] + (params[name]["b"] if "b" in params[name] else 0)
        return out.reshape(batch, length, count, d).transpose(0, 2, 1, 3)  # (batch, heads, T, d)

    q, k, v = project("q", heads), project("k", kv_heads), project("v", kv_heads)
    if layer.rope_base is not None:
        inv_freq = 1.0 / (layer.rope_base ** (np.arange(0, d, 2) / d))
        freqs = np.outer(np.arange(length), inv_freq)
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.asarray(np.cos(emb), x.dtype), jnp.asarray(np.sin(emb), x.dtype)

        def rotate_half(t):
            return jnp.concatenate([-t[..., d // 2 :], t[..., : d // 2]], axis=-1)

        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = jnp.repeat(k, heads // kv_heads, axis=1), jnp.repeat(v, heads // kv_heads, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
    allowed = jnp.ones((batch, heads, length, length), bool)
    if layer.causal:
        allowed &= jnp.tril(jnp.ones((length, length), bool))
    if mask is not None:
        allowed &= mask
    weights = jnp.where(allowed, jax.nn.softmax(scores, axis=-1, where=allowed), 0.0)
    out = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, length, heads * d)
    return out @ params["o"]["W"] + (params["o"]["b"] if "b" in params["o"] else 0)


def test_rms_norm_and_silu_forwards_against_their_definitions():
    x = jax.random.normal(jax.random.key(0), (4, 3, 7), jnp.float64) * 3 + 1
    gamma = jnp.linspace(0.5, 2, 7)
    y = mnet.RMSNorm().apply({"gamma": gamma}, x)
    xn = np.asarray(x)
    np.testing.assert_allclose(y, xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-6) * np.asarray(gamma), rtol=1e-13)
    np.testing.assert_allclose(mnet.Silu().apply((), x), xn / (1 + np.exp(-xn)), rtol=1e-13)
    z = jnp.linspace(-30, 30, 121, dtype=jnp.float64)
    cache = mnet.Silu().forward((), z[None])[1]
    assert_trees_close(mnet.Silu().backward((), cache, jnp.ones((1, 121)))[1][0], jax.vmap(jax.grad(jax.nn.silu))(z))
    second = jax.vmap(jax.grad(jax.grad(jax.nn.silu)))(z)
    assert_trees_close(mnet.Silu().activate_second(z), second, 1e-12)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_gated_mlp_forward_against_its_definition(activation):
    layer = mnet.GatedMLP(6, activation=activation, use_bias=True)
    params = random_params(layer, (3, 5), jnp.float64, np.random.default_rng(1))
    assert {k: v.shape for k, v in params.items()} == {
        "W_gate": (5, 6), "W_up": (5, 6), "W_down": (6, 5), "b_gate": (6,), "b_up": (6,), "b_down": (5,)
    }  # fmt: skip
    x = jax.random.normal(jax.random.key(2), (2, 3, 5), jnp.float64)
    act = jax.nn.silu if activation == "silu" else lambda z: jax.nn.gelu(z, approximate=False)
    gate, up = x @ params["W_gate"] + params["b_gate"], x @ params["W_up"] + params["b_up"]
    assert_trees_close(layer.apply(params, x), (act(gate) * up) @ params["W_down"] + params["b_down"], 1e-13)
    _, plain = mnet.GatedMLP(4).init(jax.random.key(0), (5,))
    assert set(plain) == {"W_gate", "W_up", "W_down"}


ATTENTION = [  # unblocked, causal, grouped-query and rotary: in tests/cases.py's DECODER_LAYERS (check_layer)
    mnet.MultiHeadSelfAttention(4, num_kv_heads=1, rope_base=500.0, block_size=3, use_bias=False),
    mnet.MultiHeadSelfAttention(2, head_dim=4, rope_base=100.0, block_size=2, causal=True),
]


@pytest.mark.parametrize("layer", ATTENTION, ids=repr)
def test_grouped_rotary_attention_is_llamas_and_its_backward_is_jax_vjp(layer):
    x = jax.random.normal(jax.random.key(0), (2, 7, 8), jnp.float64)
    params = random_params(layer, (7, 8), jnp.float64, np.random.default_rng(2))
    kv = (layer.num_kv_heads or layer.num_heads) * (layer.head_dim or 2)
    assert params["k"]["W"].shape == (8, kv) and params["q"]["W"].shape[1] == layer.num_heads * (layer.head_dim or 2)
    valid = jnp.arange(7)[None, :] < jnp.array([[7], [4]])  # the second example padded after 4 tokens
    dy = jax.random.normal(jax.random.key(3), (2, 7, 8), jnp.float64)
    for mask in (None, valid[:, None, None, :]):
        y, reference, backward, expected = attention_checks(layer, params, x, mask, dy)
        assert_trees_close(y, reference, 1e-12)
        assert_trees_close(backward, expected, 1e-11, tree_scale=True)


@functools.partial(jax.jit, static_argnums=0)
def attention_checks(layer, params, x, mask, dy):
    """The layer's output, LLaMA's, its hand backward and ``jax.vjp``'s, compiled together."""
    y, cache = layer.forward(params, x, mask=mask)
    vjp = jax.vjp(lambda p, inputs: layer.forward(p, inputs, mask=mask)[0], params, x)[1](dy)
    return y, llama_attention(layer, params, x, mask), layer.backward(params, cache, dy), vjp


@settings(max_examples=4)
@given(
    heads=st.sampled_from([(2, 1), (2, 2), (4, 2), (4, 1)]),
    half=st.integers(1, 3),
    length=st.integers(1, 6),
    rope=st.sampled_from([None, 50.0]),
)
def test_head_layout_backward_and_tangent_on_random_shapes(heads, half, length, rope):
    num_heads, kv_heads = heads
    d = 2 * half
    layout = HeadLayout(num_heads, kv_heads, d, rope)
    width = (num_heads + 2 * kv_heads) * d
    rng = np.random.default_rng(length)
    x = jnp.asarray(rng.normal(size=(2, length, width)))
    y, cache = layout.forward((), x)
    dy = jnp.asarray(rng.normal(size=y.shape))
    assert_trees_close(layout.backward((), cache, dy)[1], jax.vjp(lambda v: layout.forward((), v)[0], x)[1](dy)[0])
    assert_trees_close(layout.tangent((), cache, (), dy[..., :width]), layout.forward((), dy[..., :width])[0])


@dataclass(frozen=True, repr=False)
class RMSNormWrongBackward(mnet.RMSNorm):
    def backward(self, params, cache, dy):
        grads, dx = super().backward(params, cache, dy)
        return grads, dx * 1.01


@dataclass(frozen=True, repr=False)
class LayerNormWrongCurvature(mnet.LayerNorm):
    def diag_hessian(self, params, cache, curvature):
        share, below = super().diag_hessian(params, cache, curvature)
        return share, below.plus_diagonal(0.1 * jnp.ones_like(curvature.grad))


@dataclass(frozen=True, repr=False)
class GatedProductWrongHvp(mnet.GatedProduct):
    def backward_tangent(self, params, cache, tangents, dy, dy_tangent):
        grads, dx, dx_tangent = super().backward_tangent(params, cache, tangents, dy, dy_tangent)
        return grads, dx, dx_tangent * 0.9


@dataclass(frozen=True, repr=False)
class HeadLayoutWrongTranspose(HeadLayout):
    def backward(self, params, cache, dy):
        return (), super().backward(params, cache, dy[..., ::-1])[1]


@pytest.mark.parametrize(
    "net, shape, wrong",
    [
        (RMSNormWrongBackward(), (3, 4), "backward"),
        (mnet.serial(mnet.Dense(4), LayerNormWrongCurvature(), mnet.Dense(2)), (3,), "diag_hessian"),
        (mnet.serial(mnet.Dense(4), GatedProductWrongHvp(), mnet.Dense(2)), (3,), "backward_tangent"),
        (mnet.serial(mnet.Dense(8), HeadLayoutWrongTranspose(2, 1, 2, 10.0), mnet.Dense(2)), (3, 2), "backward"),
    ],
    ids=["rmsnorm", "layernorm", "gated", "heads"],
)
def test_check_layer_names_a_planted_wrong_rule(net, shape, wrong):
    report = mnet.check_layer(net, shape, batch=2)
    assert not report.ok and wrong in report.wrong, str(report)


def test_every_quantity_through_a_gpt_agrees_with_autodiff():
    # Grouped-query (one key-value head), rotary, GeGLU, the read-out tied to the embedding; blockwise attention is
    # the same network with the core of tests/layers/test_blockwise_attention.py, whose rules are checked there.
    net = mnet.models.gpt(vocab=7, context=6, d_model=4, num_layers=1, num_heads=2, num_kv_heads=1, hidden=6,
                          activation="gelu", tie_embeddings=True)  # fmt: skip
    report = mnet.check_network(net, LOSS, (5,), batch=2, seed=3)
    assert report.ok, str(report)
    for row in report.rows:
        if row.agreement is not None:
            a = row.agreement
            assert min(a.max_rel_error, a.max_abs_error / max(a.global_scale, 1e-300)) < 1e-9, str(report)
    assert report["diag_hessian"].agreement is not None  # the tied table's exact diagonal, cross terms included


def test_a_tied_table_gets_the_sum_of_its_two_uses():
    net = mnet.models.gpt(vocab=9, context=8, d_model=8, num_layers=1, num_heads=2, tie_embeddings=True)
    params = random_params(net, (6,), jnp.float64, np.random.default_rng(0))
    ids = jax.random.randint(jax.random.key(1), (3, 7), 0, 9)
    x, y = ids[:, :-1], ids[:, 1:]
    tied = net.layers[0]
    grads = jax.jit(mnet.grad(net, LOSS))(params, x, y)
    untied = mnet.serial(tied.embedding, *tied.body.layers, mnet.Unembed(9))
    table = params[0]["embedding"]
    separate = jax.jit(mnet.grad(untied, LOSS))((table, *params[0]["body"], table), x, y)
    assert_trees_close(grads[0]["embedding"], jax.tree_util.tree_map(jnp.add, separate[0], separate[-1]), 1e-13)
    factors = jax.eval_shape(mnet.kfac_factors(net, LOSS), params, x, y)  # the structure: nothing to compute
    assert factors[0]["embedding"] is None  # no Kronecker structure for a matrix used twice
    # The Hessian diagonal (the uses' diagonals plus twice their mixed block) is compared with jax.hessian by
    # test_every_quantity_through_a_gpt_agrees_with_autodiff and the random-GPT sweep, tied configurations included.


def gpt_problem(dtype=jnp.float64, **options):
    net = mnet.models.gpt(vocab=9, context=8, d_model=8, num_layers=1, num_heads=2, num_kv_heads=1, **options)
    _, params = net.init(jax.random.key(0), (6,), dtype)
    ids = jax.random.randint(jax.random.key(1), (3, 7), 0, 9)
    return net, params, ids[:, :-1], ids[:, 1:]


def test_the_hand_derived_quantities_of_a_gpt_use_no_autodiff():
    net, params, x, y = gpt_problem()
    tied, tied_params, _, _ = gpt_problem(tie_embeddings=True)
    v = jax.tree_util.tree_map(jnp.ones_like, params)
    functions = {
        "value_and_grad": (mnet.value_and_grad(net, LOSS), (params, x, y)),
        "norms": (mnet.per_example_grad_norms(net, LOSS), (params, x, y)),
        "hvp": (mnet.hessian_vector_product(net, LOSS), (params, x, y, v)),
        "diag_hessian": (mnet.diag_hessian(net, LOSS), (params, x, y)),
        "diag_hessian_tied": (mnet.diag_hessian(tied, LOSS), (tied_params, x, y)),
    }
    # JAX differentiates while it traces (the guard refuses jax.make_jaxpr(jax.grad(f)) too, as
    # tests/quantities/test_no_autodiff.py checks), so tracing under the guard is the test; the values are
    # test_every_quantity_through_a_gpt_agrees_with_autodiff's (tracing, not compiling: a fraction of the cost).
    with no_autodiff():
        for f, args in functions.values():
            assert jax.make_jaxpr(f)(*args).eqns
    factors = jax.eval_shape(mnet.kfac_factors(net, LOSS), params, x, y)  # Dense's rules, checked elsewhere
    pairs = jax.tree_util.tree_leaves(factors, is_leaf=mnet.quantities.kronecker.is_factor_pair)
    assert (
        len([p for p in pairs if isinstance(p, dict)]) == 1 + 4 + 3 + 1
    )  # the embedding; q, k, v, o; gate, up, down; the read-out


def test_hutchinson_is_an_unbiased_estimate_of_the_hessian_diagonal():
    net = mnet.serial(mnet.Dense(4), mnet.Silu(), mnet.RMSNorm(), mnet.Dense(3))
    params = random_params(net, (3,), jnp.float64, np.random.default_rng(0))
    x, y = jax.random.normal(jax.random.key(1), (5, 3), jnp.float64), jnp.arange(5) % 3
    exact = mnet.diag_hessian(net, LOSS)(params, x, y)
    samples = 400
    estimate = jax.jit(mnet.diag_hessian(net, LOSS, hutchinson_samples=samples))(params, x, y, key=jax.random.key(5))
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    H = jax.hessian(lambda f: LOSS.value(net.apply(unravel(f), x), y))(flat)
    variance = jnp.sum(H**2, axis=1) - jnp.diag(H) ** 2  # of one Rademacher sample, per entry
    assert_trees_close(jax.flatten_util.ravel_pytree(exact)[0], jnp.diag(H), 1e-10)
    error = jax.flatten_util.ravel_pytree(estimate)[0] - jnp.diag(H)
    assert float(jnp.max(jnp.abs(error) / jnp.sqrt(variance / samples + 1e-30))) < 5.0
    assert float(jnp.linalg.norm(error)) > 0  # an estimate, not the exact diagonal under another name
    with pytest.raises(ValueError, match="key"):
        mnet.diag_hessian(net, LOSS, hutchinson_samples=3)(params, x, y)
    with pytest.raises(ValueError, match="positive int"):
        mnet.diag_hessian(net, LOSS, hutchinson_samples=0)


def test_bad_decoder_configurations_and_inputs_are_named():
    with pytest.raises(ValueError, match="num_kv_heads = 3 does not divide num_heads = 4"):
        mnet.MultiHeadSelfAttention(4, num_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim must be even"):
        mnet.MultiHeadSelfAttention(2, head_dim=3, rope_base=10000.0)
    with pytest.raises(mnet.LayerError, match="head_dim must be even, got head_dim = 3"):
        mnet.MultiHeadSelfAttention(2, rope_base=10000.0).init(jax.random.key(0), (4, 6))
    with pytest.raises(ValueError, match="activation must be one of"):
        mnet.GatedMLP(4, activation="relu")
    net, params, x, _ = gpt_problem()
    with pytest.raises(mnet.LayerError, match=r"Embedding\(9, 8, max_length=8\) at position \[0\].*10 positions"):
        net.apply(params, jnp.zeros((2, 10), jnp.int32))
    with pytest.raises(mnet.LayerError, match=r"ids must lie in \[0, 9\), found 9"):
        net.apply(params, x.at[0, 0].set(9))
    with pytest.raises(ValueError, match="does not divide d_model"):
        mnet.models.gpt(9, 8, 6, 1, 4)


def test_float32_gpt_training_with_hand_gradients_tracks_jax_grad():
    net, params, x, y = gpt_problem(jnp.float32, block_size=4)
    optimizer = optax.adam(3e-3)

    def trainer(value_and_grad):
        @jax.jit
        def step(state, _):
            p, opt = state
            value, grads = value_and_grad(p, x, y)
            updates, opt = optimizer.update(grads, opt, p)
            return (optax.apply_updates(p, updates), opt), value

        return jax.lax.scan(step, (params, optimizer.init(params)), None, length=50)[1]

    hand = trainer(mnet.value_and_grad(net, LOSS))
    auto = trainer(mnet.autodiff_value_and_grad(net, LOSS))
    assert float(hand[-1]) < 0.8 * float(hand[0])  # it learns
    np.testing.assert_allclose(hand, auto, rtol=1e-4)


def test_gpt_curvature_experiment_quick(tmp_path):
    """``experiments/gpt_curvature.py --quick``: curvature per block while a decoder trains, and its picture."""
    result = load_experiment("gpt_curvature").main(["--quick", "--out", str(tmp_path)])
    assert result["step"] == [0, 3, 6] and len(result["blocks"]) == 5
    assert all(len(traces) == 5 and min(traces) >= 0 for traces in result["ggn_trace"])  # sums of squares
    assert all(np.isfinite(traces).all() for traces in result["hessian_trace"])
    assert all(len(norms) == 4 and min(norms) > 0 for norms in result["norms"])
    assert (tmp_path / "gpt_curvature.png").stat().st_size > 10_000


# Every quantity through random GPT configurations (layers, heads, key-value heads, rotary positions on or off,
# blockwise or whole attention, tied or untied read-out, GeGLU or SwiGLU, padding masks) against dense autodiff
# references of the masked loss in float64: all hand quantities compiled as one program, all references as another.

SWEEP_VOCAB, SWEEP_T, BATCH = 5, 4, 2


@st.composite
def configurations(draw):
    heads = draw(st.sampled_from([1, 2]))
    return dict(
        num_layers=draw(st.sampled_from([1, 2])),
        num_heads=heads,
        num_kv_heads=draw(st.sampled_from([k for k in (1, 2) if heads % k == 0])),
        rope_base=draw(st.sampled_from([None, 30.0])),
        block_size=draw(st.sampled_from([None, 2])),
        tie_embeddings=draw(st.booleans()),
        activation=draw(st.sampled_from(["silu", "gelu"])),
        lengths=draw(st.lists(st.integers(0, SWEEP_T), min_size=BATCH, max_size=BATCH)),
        seed=draw(st.integers(0, 2**16)),
    )


def hand_quantities(net, params, x, y, mask, v, x2, mask2):
    value, grad = mnet.value_and_grad(net, LOSS)(params, x, y, mask=mask)
    return {
        "value": value,
        "grad": grad,
        "per_example_grads": mnet.per_example_grads(net, LOSS)(params, x, y, mask=mask),
        "norms": mnet.per_example_grad_norms(net, LOSS)(params, x, y, mask=mask),
        "jvp": mnet.jvp(net)(params, x, v, None, mask=mask)[1],
        "ntk": mnet.ntk(net)(params, x, x2, mask=mask, mask2=mask2),
        "ggn_vp": mnet.ggn_vector_product(net, LOSS)(params, x, y, v, mask=mask),
        "hvp": mnet.hessian_vector_product(net, LOSS)(params, x, y, v, mask=mask),
        "diag_ggn": mnet.diag_ggn(net, LOSS)(params, x, y, mask=mask),
        "per_example_diag_ggn": mnet.per_example_diag_ggn(net, LOSS)(params, x, y, mask=mask),
    }


def reference_quantities(net, params, x, y, mask, v, x2, mask2):
    """Autodiff of the masked loss: the mean over examples of each example's mean over its own tokens."""
    masked, labels = LOSS.masked(y, mask)
    flat, unravel = ravel_pytree(params)

    def outputs(p, inputs=x, m=mask):
        return net.apply(p, inputs, mask=m)

    def objective(p):
        return masked.value(outputs(p), labels)

    def per_example(p):
        return masked.per_example(outputs(p), labels)

    J = jax.jacrev(lambda f: outputs(unravel(f)))(flat).reshape(BATCH, -1, flat.size)  # (batch, SWEEP_T * V, P)
    J2 = jax.jacrev(lambda f: outputs(unravel(f), x2, mask2))(flat).reshape(BATCH + 1, -1, flat.size)
    H = jax.vmap(jax.hessian(lambda o, t: masked.per_example(o[None], t[None])[0]))(outputs(params), labels)
    H = H.reshape(BATCH, J.shape[1], J.shape[1])
    per_example_grads = jax.jacrev(lambda f: per_example(unravel(f)))(flat)  # (batch, P)
    per_example_ggn = jnp.einsum("bop,boq,bqp->bp", J, H, J)
    rows = jax.vmap(unravel)
    return {
        "value": objective(params),
        "grad": jax.grad(objective)(params),
        "per_example_grads": rows(per_example_grads),
        "norms": jnp.linalg.norm(per_example_grads, axis=1),
        "jvp": jax.jvp(outputs, (params,), (v,))[1],
        "ntk": jnp.einsum("aip,cip->ac", J, J2),  # summed over the outputs, as mnet.ntk
        "ggn_vp": unravel(jnp.einsum("bop,boq,bqr,r->p", J, H, J, ravel_pytree(v)[0]) / BATCH),
        "hvp": jax.jvp(jax.grad(objective), (params,), (v,))[1],
        "diag_ggn": unravel(per_example_ggn.mean(0)),
        "per_example_diag_ggn": rows(per_example_ggn),
    }


@settings(max_examples=3, deadline=None, phases=[Phase.explicit, Phase.generate])  # no shrinking: compiles
@given(configurations())
def test_every_quantity_through_random_gpts_with_padding(config):
    lengths, seed = config.pop("lengths"), config.pop("seed")
    net = mnet.models.gpt(SWEEP_VOCAB, SWEEP_T, 4, hidden=6, **config)
    rng = np.random.default_rng(seed)
    _, params = net.init(jax.random.key(seed), (SWEEP_T,), jnp.float64)
    params = perturbed(params, rng)
    x = jnp.asarray(rng.integers(0, SWEEP_VOCAB, (BATCH, SWEEP_T)))
    y = jnp.asarray(rng.integers(0, SWEEP_VOCAB, (BATCH, SWEEP_T)))
    mask = jnp.arange(SWEEP_T)[None] < jnp.asarray(lengths)[:, None]
    x2 = jnp.asarray(rng.integers(0, SWEEP_VOCAB, (BATCH + 1, SWEEP_T)))
    mask2 = jnp.asarray(rng.random((BATCH + 1, SWEEP_T)) < 0.7)
    v = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
    arguments = (params, x, y, mask, v, x2, mask2)
    hand = jax.jit(lambda *a: hand_quantities(net, *a))(*arguments)
    expected = jax.jit(lambda *a: reference_quantities(net, *a))(*arguments)
    for name in expected:
        assert_trees_close(hand[name], expected[name], 1e-9, tree_scale=True)
    # The exact diagonal's blockwise core equals the whole one (tests/layers/test_blockwise_attention.py): here the
    # whole core, which compiles in half the time.
    if config["block_size"] is None:
        flat, unravel = ravel_pytree(params)
        masked, labels = LOSS.masked(y, mask)
        dense = jax.jit(jax.hessian(lambda f: masked.value(net.apply(unravel(f), x, mask=mask), labels)))(flat)
        diagonal = jax.jit(mnet.diag_hessian(net, LOSS))(params, x, y, mask=mask)
        assert_trees_close(diagonal, unravel(jnp.diag(dense)), 1e-9, tree_scale=True)
