"""Blockwise attention (``MultiHeadSelfAttention(..., block_size=n)``): forward against an independent softmax
attention and backward against ``jax.vjp`` in float64, for block sizes that divide T and that do not, causal and
not, padding and arbitrary masks, several heads; every derivative function through it against autodiff; the
no-autodiff guard; and the memory claim on compiled programs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnet
from mnet.bench.memory import memory_problem
from mnet.compiled import compiled_memory
from mnet.layers.attention.blockwise import BlockwiseAttentionCore
from mnet.layers.attention.core import AttentionCore
from tests.helpers import assert_trees_close, load_experiment, no_autodiff, random_params, reference_attention

# (heads, head_dim, T, block_size, causal): block sizes that divide T, that do not, and one larger than T.
CASES = [
    (1, 3, 8, 4, False),
    (2, 2, 7, 3, True),
    (3, 2, 9, 2, False),
    (4, 2, 5, 8, False),
]


@jax.jit(static_argnums=0)
def layer_checks(layer, params, x, mask, dy):
    y, cache = layer.forward(params, x, mask=mask)
    expected, vjp = jax.vjp(lambda p, x: reference_attention(layer, p, x, mask), params, x)
    return y, expected, layer.backward(params, cache, dy), vjp(dy), cache


@pytest.mark.parametrize("heads, head_dim, length, block, causal", CASES)
def test_blockwise_layer_equals_softmax_attention_and_jax_vjp(heads, head_dim, length, block, causal):
    rng = np.random.default_rng(length * 10 + block)
    layer = mnet.MultiHeadSelfAttention(heads, head_dim=head_dim, causal=causal, block_size=block)
    batch, width = 3, 4
    params = random_params(layer, (length, width), jnp.float64, rng)
    x = jnp.asarray(rng.normal(size=(batch, length, width)))
    dy = jnp.asarray(rng.normal(size=(batch, length, width)))
    valid = np.arange(length)[None, :] < rng.integers(1, length + 1, batch)[:, None]  # padded sequences
    masks = [
        None,
        jnp.asarray(valid[:, None, None, :]),
        jnp.asarray(rng.random((batch, heads, length, length)) < 0.6),
    ]  # rows with no key included
    for mask in masks:
        y, expected, hand, reference, cache = layer_checks(layer, params, x, mask, dy)
        np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
        assert_trees_close(hand, reference, 1e-10, tree_scale=True)
        # the cache keeps no T x T array: Q, K, V, O and L hold at most (padded T) x head_dim numbers per head
        padded = -(-length // block) * block
        assert padded * head_dim < length * length
        for leaf in jax.tree_util.tree_leaves(cache[1][:5]):
            assert leaf.size <= batch * heads * padded * head_dim, leaf.shape


@pytest.mark.parametrize("heads, head_dim, length, block, causal", CASES[:4])
def test_blockwise_core_rules_equal_the_unblocked_core(heads, head_dim, length, block, causal):
    """Forward, backward, forward mode and the Hessian-vector rule of the core, rule by rule, equal the unblocked
    core's (itself checked against autodiff) to 1e-12, with a padding mask."""
    rng = np.random.default_rng(block)
    dense, blockwise = AttentionCore(heads, head_dim, causal), BlockwiseAttentionCore(heads, head_dim, causal, block)
    qkv, t = (jnp.asarray(rng.normal(size=(2, length, 3 * heads * head_dim))) for _ in range(2))
    mask = jnp.asarray(np.arange(length)[None, None, None, :] < np.array([length, length - 2])[:, None, None, None])

    @jax.jit
    def rules(qkv, t, dy, dy_t):
        results = []
        for core in (dense, blockwise):
            y, cache = core.forward((), qkv, mask)
            results.append(
                (
                    y,
                    core.backward((), cache, dy)[1],
                    core.tangent((), cache, (), t),
                    core.backward_tangent((), cache, ((), t), dy, dy_t)[1:],
                    core.backward_tangent((), cache, ((), None), dy, dy_t)[2],
                )
            )
        return results

    dy, dy_t = (jnp.asarray(rng.normal(size=(2, length, heads * head_dim))) for _ in range(2))
    unblocked, blocked = rules(qkv, t, dy, dy_t)
    assert_trees_close(blocked, unblocked, 1e-12, tree_scale=True)


BLOCKWISE_TRANSFORMER = mnet.serial(
    mnet.Embedding(7, 8),
    mnet.residual(mnet.serial(mnet.LayerNorm(), mnet.MultiHeadSelfAttention(2, causal=True, block_size=2))),
    mnet.residual(mnet.serial(mnet.LayerNorm(), mnet.Dense(16), mnet.Gelu(), mnet.Dense(8))),
    mnet.LayerNorm(),
    mnet.Flatten(),
    mnet.Dense(3),
)


def blockwise_problem(batch=4, length=5):
    rng = np.random.default_rng(3)
    params = random_params(BLOCKWISE_TRANSFORMER, (length,), jnp.float64, rng)
    return params, jnp.asarray(rng.integers(0, 7, (batch, length))), jnp.asarray(rng.integers(0, 3, batch))


def test_every_derivative_through_blockwise_attention():
    """The gradient against autodiff, without autodiff; per-example gradients and norms, DP clipping, the Jacobian,
    the NTK, the GGN diagonal, K-FAC factors, forward mode and Hessian-vector products equal those of the same
    network with unblocked attention (each checked against autodiff in its own tests), also without autodiff."""
    params, ids, y = blockwise_problem()
    loss = mnet.losses.softmax_cross_entropy
    expected = jax.jit(mnet.autodiff_value_and_grad(BLOCKWISE_TRANSFORMER, loss))(params, ids, y)
    unblocked = mnet.serial(
        mnet.Embedding(7, 8),
        mnet.residual(mnet.serial(mnet.LayerNorm(), mnet.MultiHeadSelfAttention(2, causal=True))),
        *BLOCKWISE_TRANSFORMER.layers[2:],
    )
    v = jax.tree_util.tree_map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape), params)

    @jax.jit(static_argnums=0)
    def quantities(net):
        return (
            mnet.value_and_grad(net, loss)(params, ids, y),
            mnet.per_example_grads(net, loss)(params, ids, y),
            mnet.per_example_grad_norms(net, loss)(params, ids, y),
            mnet.clipped_value_and_grad(net, loss, 0.5)(params, ids, y),
            mnet.jacobian(net)(params, ids),
            mnet.ntk(net)(params, ids, ids[::-1][:3]),
            mnet.diag_ggn(net, loss)(params, ids, y),
            mnet.kfac_factors(net, loss)(params, ids, y),
            mnet.jvp(net)(params, ids, v, None),
            mnet.hessian_vector_product(net, loss)(params, ids, y, v),
        )

    with no_autodiff():
        blocked = quantities(BLOCKWISE_TRANSFORMER)
    assert_trees_close(blocked[0], expected, 1e-10, tree_scale=True)
    assert_trees_close(blocked, quantities(unblocked), 1e-10, tree_scale=True)


def test_blockwise_step_keeps_a_quarter_of_autodiffs_memory_at_1024():
    """The memory claim on compiled programs (XLA's memory analysis; no timing): one training step of the M1
    transformer (width 64, 4 heads, batch 4) at T = 1024 with blockwise attention needs under a quarter of the
    temporary bytes of the same step under jax.grad."""
    figures = {
        name: compiled_memory(step.func.lower(*step.args).compile()) for name, step in memory_problem(1024).items()
    }
    if figures["jax.grad"] == "n/a":
        pytest.skip("this backend has no memory analysis")
    blockwise, autodiff = figures["hand blockwise"]["temp_bytes"], figures["jax.grad"]["temp_bytes"]
    assert 0 < blockwise < 0.25 * autodiff, figures
    assert figures["hand blockwise"]["temp_bytes"] < figures["hand"]["temp_bytes"], figures


def test_bad_block_size_is_named():
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        mnet.MultiHeadSelfAttention(2, block_size=0)
    assert (
        repr(mnet.MultiHeadSelfAttention(2, causal=True, block_size=64))
        == "MultiHeadSelfAttention(2, causal=True, block_size=64)"
    )


def test_char_lm_experiment_quick(tmp_path):
    """``experiments/char_lm.py --quick``: a causal character model on the standard library's source learns
    (validation bits per character fall), samples text from its prompt, and reports each path's step memory,
    the blockwise hand step the smallest."""
    result = load_experiment("char_lm").main(["--quick", "--out", str(tmp_path)])
    bits = result["history"]["valid_bits"]
    assert all(np.isfinite(bits)) and bits[-1] < bits[0] - 0.3, bits
    assert result["sample"].startswith("def ") and len(result["sample"]) == 44
    memory = result["memory"]
    assert memory["hand, blockwise attention"] < min(
        value for name, value in memory.items() if name != "hand, blockwise attention"
    ), memory
    assert (tmp_path / "char_lm.png").stat().st_size > 10_000


def test_attention_memory_experiment_quick(tmp_path):
    result = load_experiment("attention_memory").main(["--quick", "--out", str(tmp_path)])
    megabytes = result["megabytes"]
    assert result["lengths"] == [128, 256]
    assert megabytes["hand blockwise"][1] < megabytes["hand"][1] < megabytes["jax.grad"][1], megabytes
    assert (tmp_path / "attention_memory.png").stat().st_size > 10_000
