"""Influence scores against dense constructions: with the exact preconditioner ``g_q^T (GGN + damping I)^-1 g_n``
built by autodiff (``jax.grad`` example by example, ``jax.jacrev`` and ``jax.hessian`` for the GGN); every other
preconditioner against its own dense matrix (the diagonal, K-FAC's and EK-FAC's Kronecker blocks assembled and
solved densely); chunking, self-influence, top-k, memory from XLA's analysis as the training set grows, no
autodiff, and the refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import mnet
from mnet.core.paths import at_path, flatten_with_keys
from mnet.errors import DataError, LayerError, SettingError
from mnet.influence import pairwise_scores
from mnet.quantities.ekfac import is_eigen_block
from mnet.quantities.kronecker import is_factor_pair, stack_bias
from tests.helpers import no_autodiff

CE, MSE = mnet.losses.softmax_cross_entropy, mnet.losses.mse
MLP = mnet.serial(mnet.Dense(5), mnet.Tanh(), mnet.Dense(3))


def problem(seed=0, n=48, net=MLP, shape=(4,), loss=CE):
    _, params = net.init(jax.random.key(seed), shape, jnp.float64)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n,) + shape))
    y = jnp.asarray(rng.integers(0, 3, n)) if loss is CE else jnp.asarray(rng.normal(size=(n, 3)))
    return params, x, y


def flat_grads(net, loss, params, x, y):
    """``(n, P)``: every example's gradient by ``jax.grad``, flattened as ``ravel_pytree`` does."""
    return jax.vmap(
        lambda xb, yb: ravel_pytree(jax.grad(lambda p: loss.value(net.apply(p, xb[None]), yb[None]))(params))[0]
    )(x, y)


def dense_ggn(net, loss, params, x, y):
    flat, unravel = ravel_pytree(params)
    J = jax.vmap(lambda xb: jax.jacrev(lambda f: net.apply(unravel(f), xb[None])[0].reshape(-1))(flat))(x)
    outputs = net.apply(params, x)
    m = outputs[0].size

    def one_hessian(o, t):
        return jax.hessian(lambda u: loss.per_example(u.reshape((1,) + o.shape), t[None])[0])(o.reshape(-1))

    H = jax.vmap(one_hessian)(outputs, y).reshape(-1, m, m)
    return jnp.einsum("bop,boq,bqr->pr", J, H, J) / x.shape[0]


def solve_scores(matrix, damping, Gq, Gn):
    return Gq @ jnp.linalg.solve(matrix + damping * jnp.eye(matrix.shape[0]), Gn.T)


@pytest.mark.parametrize("kind", ["kflr", "empirical"])
@pytest.mark.parametrize("loss", [CE, MSE])
def test_exact_preconditioner_against_the_dense_autodiff_ggn(kind, loss):
    params, x, y = problem(1, loss=loss)
    qx, qy = x[:5] + 0.1, y[:5]
    Gn, Gq = flat_grads(MLP, loss, params, x, y), flat_grads(MLP, loss, params, qx, qy)
    curvature = dense_ggn(MLP, loss, params, x, y) if kind == "kflr" else Gn.T @ Gn / x.shape[0]
    model = mnet.influence(MLP, loss, params, x, y, preconditioner="ggn", kind=kind, damping=1e-3, batch_size=20)
    expected = solve_scores(curvature, 1e-3, Gq, Gn)
    np.testing.assert_allclose(
        model.scores(qx, qy), expected, rtol=1e-8, atol=1e-10 * float(jnp.max(jnp.abs(expected)))
    )
    np.testing.assert_allclose(model.self_influence(), jnp.diag(solve_scores(curvature, 1e-3, Gn, Gn)), rtol=1e-8)


def kronecker_matrix(params, entries, P, diagonal=None):
    """The dense preconditioner with the Kronecker blocks ``entries`` (``path -> (M_ij)`` matrices acting on the
    row-major ``[W; b]``), as a matrix in ``ravel_pytree``'s coordinates: each block's rows and columns found by
    unravelling the unit vectors; elsewhere ``diag(diagonal)`` (the fallback), or zero."""
    flat, unravel = ravel_pytree(params)
    basis = jax.vmap(lambda e: unravel(e))(jnp.eye(P))
    matrix = np.zeros((P, P)) if diagonal is None else np.diag(np.asarray(diagonal))
    for path, block in entries.items():
        coordinates = np.asarray(jax.vmap(lambda tree, p=path: stack_bias(at_path(tree, p)).reshape(-1))(basis))
        index = np.argmax(np.abs(coordinates), axis=0)  # the flat coordinate behind each entry of [W; b]
        matrix[np.ix_(index, index)] = block
    return jnp.asarray(matrix)


def test_every_other_preconditioner_against_its_own_dense_matrix():
    params, x, y = problem(2)
    qx, qy = x[:4] * 1.5, y[:4]
    Gn, Gq = flat_grads(MLP, CE, params, x, y), flat_grads(MLP, CE, params, qx, qy)
    P, damping = Gn.shape[1], 2e-3
    diagonal = jnp.diag(dense_ggn(MLP, CE, params, x, y))
    factors = mnet.kfac_factors(MLP, CE)(params, x, y)  # one position per example: the GGN block's own factors
    kfac = {
        path: jnp.kron(pair["A"], pair["G"])
        for path, pair in flatten_with_keys(factors, is_factor_pair)
        if is_factor_pair(pair)
    }
    blocks = mnet.ekfac_factors(MLP, CE)(params, x, y)
    ekfac = {}
    for path in kfac:
        block = at_path(blocks, path)
        Q = jnp.kron(block["QA"], block["QG"])
        ekfac[path] = Q @ jnp.diag(block["S"].reshape(-1)) @ Q.T
    dense = {
        "identity": jnp.eye(P),
        "diag": jnp.diag(diagonal),
        "kfac": kronecker_matrix(params, kfac, P),
        "ekfac": kronecker_matrix(params, ekfac, P),
    }
    for name, matrix in dense.items():
        for batch_size in (48, 13):  # one chunk, and means over chunks of unequal sizes
            model = mnet.influence(MLP, CE, params, x, y, preconditioner=name, damping=damping, batch_size=batch_size)
            np.testing.assert_allclose(
                model.scores(qx, qy), solve_scores(matrix, damping, Gq, Gn), rtol=1e-8, atol=1e-12, err_msg=name
            )


def test_default_damping_self_influence_and_top_k():
    params, x, y = problem(3)
    model = mnet.influence(MLP, CE, params, x, y, preconditioner="diag")
    diagonal = jnp.diag(dense_ggn(MLP, CE, params, x, y))
    np.testing.assert_allclose(model.damping, 0.1 * jnp.mean(diagonal), rtol=1e-10)
    scores = model.scores(x[:6], y[:6])
    np.testing.assert_allclose(model.self_influence()[:6], jnp.diag(scores), rtol=1e-9)
    top = model.top_k(x[:6], y[:6], 5)
    order = np.argsort(-np.asarray(scores), axis=1)
    np.testing.assert_array_equal(top.helpful, order[:, :5])
    np.testing.assert_array_equal(top.harmful, order[:, ::-1][:, :5])
    np.testing.assert_allclose(top.harmful_scores, np.sort(np.asarray(scores), axis=1)[:, :5])
    assert np.all(np.asarray(top.helpful_scores)[:, 0] > 0) and np.all(np.asarray(top.harmful_scores)[:, 0] < 0)


def test_ekfac_on_positions_and_layers_without_kronecker_structure():
    """A convolution (windows as positions) and a LayerNorm: refused by name without a fallback, covered by the
    diagonal with one; the scores' dense construction as above, the LayerNorm's part divided by the diagonal."""
    net = mnet.serial(mnet.Conv2D(2, 3, padding="SAME"), mnet.Tanh(), mnet.Flatten(), mnet.LayerNorm(), mnet.Dense(3))
    params, x, y = problem(4, n=12, net=net, shape=(4, 4, 1))
    with pytest.raises(LayerError, match=r"LayerNorm\(\): at params\[3\] has parameters but no Kronecker structure"):
        mnet.influence(net, CE, params, x, y, preconditioner="ekfac")
    model = mnet.influence(net, CE, params, x, y, preconditioner="ekfac", fallback="diag", damping=1e-2)
    Gn = flat_grads(net, CE, params, x, y)
    P = Gn.shape[1]
    blocks = mnet.ekfac_factors(net, CE)(params, x, y)
    entries = {}
    for index in (0, 4):
        Q = jnp.kron(blocks[index]["QA"], blocks[index]["QG"])
        entries[(index,)] = Q @ jnp.diag(blocks[index]["S"].reshape(-1)) @ Q.T
    matrix = kronecker_matrix(params, entries, P)
    norm = jnp.diag(dense_ggn(net, CE, params, x, y))
    _, unravel = ravel_pytree(params)
    in_norm = np.asarray(
        ravel_pytree(
            jax.tree_util.tree_map(jnp.zeros_like, params[:3])
            + (jax.tree_util.tree_map(jnp.ones_like, params[3]),)
            + (jax.tree_util.tree_map(jnp.zeros_like, params[4]),)
        )[0],
        bool,
    )
    matrix = matrix.at[np.where(in_norm)[0], np.where(in_norm)[0]].set(norm[in_norm])
    np.testing.assert_allclose(
        model.scores(x[:3], y[:3]), solve_scores(matrix, 1e-2, Gn[:3], Gn), rtol=1e-8, atol=1e-12
    )


@pytest.mark.parametrize("tie", [False, True])
def test_a_decoder_with_ekfac_and_the_exact_ggn(tie):
    """The GPT (grouped-query attention, rotary positions, RMSNorm, a gated MLP, optionally a tied read-out): the
    exact preconditioner against the dense autodiff GGN of the sequence loss, and EK-FAC (attention's and the gated
    MLP's projections, the embedding; RMSNorm and a tied table by the diagonal) against its dense construction."""
    net = mnet.models.gpt(11, 6, 8, 1, 2, num_kv_heads=1, hidden=12, tie_embeddings=tie)
    _, params = net.init(jax.random.key(0), (6,), jnp.float64)
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.integers(0, 11, (12, 6))), jnp.asarray(rng.integers(0, 11, (12, 6)))
    Gn, ggn = jax.jit(lambda p: (flat_grads(net, CE, p, x, y), dense_ggn(net, CE, p, x, y)))(params)
    exact = mnet.influence(net, CE, params, x, y, preconditioner="ggn", damping=1e-3, batch_size=6)
    expected = solve_scores(ggn, 1e-3, Gn[:3], Gn)
    np.testing.assert_allclose(
        exact.scores(x[:3], y[:3]), expected, rtol=1e-8, atol=1e-10 * float(jnp.max(jnp.abs(expected)))
    )
    model = mnet.influence(net, CE, params, x, y, preconditioner="ekfac", fallback="diag", damping=1e-3, batch_size=12)
    blocks = mnet.ekfac_factors(net, CE)(params, x, y)
    entries = {}
    for path, block in flatten_with_keys(blocks, is_leaf=lambda n: n is None or is_eigen_block(n)):
        if is_eigen_block(block):
            Q = jnp.kron(block["QA"], block["QG"])
            entries[path] = Q @ jnp.diag(block["S"].reshape(-1)) @ Q.T
    assert len(entries) == (7 if tie else 9)  # q, k, v, o, gate, up, down; untied, the embedding and the read-out too
    matrix = kronecker_matrix(params, entries, Gn.shape[1], jnp.diag(ggn))
    np.testing.assert_allclose(
        model.scores(x[:3], y[:3]), solve_scores(matrix, 1e-3, Gn[:3], Gn), rtol=1e-8, atol=1e-10
    )


def test_memory_stays_that_of_the_queries_as_the_training_set_grows():
    """The compiled scoring of the whole training set (``lax.map`` over chunks) holds the preconditioned queries,
    one chunk's activations per query, and the ``(Q, n)`` scores: its temporary memory does not grow with ``n``,
    and is far below the per-example gradients' ``n x P`` numbers."""
    net = mnet.serial(mnet.Dense(64), mnet.Tanh(), mnet.Dense(10))
    _, params = net.init(jax.random.key(0), (32,), jnp.float32)
    P = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    queries = jax.tree_util.tree_map(lambda p: jnp.zeros((4,) + p.shape, p.dtype), params)
    score = pairwise_scores(net, CE, 64)
    temps = {}
    for n in (512, 8192):
        x, y = jax.ShapeDtypeStruct((n, 32), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.int32)
        compiled = jax.jit(score).lower(params, queries, x, y).compile()
        temps[n] = compiled.memory_analysis().temp_size_in_bytes
    assert temps[8192] <= temps[512] * 1.1 + 4 * 4 * 8192, temps
    assert temps[8192] < 0.05 * 8192 * P * 4, (temps, P)


def test_influence_runs_without_autodiff():
    params, x, y = problem(5)
    expected = mnet.influence(MLP, CE, params, x, y, preconditioner="ekfac", damping=1e-3).scores(x[:2], y[:2])
    with no_autodiff():
        for name in ("identity", "diag", "kfac", "ekfac", "ggn"):
            for kind in ("kflr", "empirical"):
                model = mnet.influence(
                    MLP, CE, params, x, y, preconditioner=name, kind=kind, damping=1e-3, batch_size=20
                )
                got = model.scores(x[:2], y[:2])
                model.self_influence()
                if (name, kind) == ("ekfac", "kflr"):
                    np.testing.assert_allclose(got, expected, rtol=1e-10)
        mnet.influence(MLP, CE, params, x, y, kind="kfac", key=jax.random.key(0)).scores(x[:2], y[:2])


def test_influence_refuses_bad_input():
    params, x, y = problem(6, n=10)
    with pytest.raises(SettingError, match="damping must be a positive number"):
        mnet.influence(MLP, CE, params, x, y, damping=0.0)
    with pytest.raises(SettingError, match="damping must be a positive number"):
        mnet.influence(MLP, CE, params, x, y, damping=-1)
    with pytest.raises(SettingError, match="preconditioner must be one of"):
        mnet.influence(MLP, CE, params, x, y, preconditioner="hessian")
    with pytest.raises(SettingError, match="pass key"):
        mnet.influence(MLP, CE, params, x, y, kind="kfac")
    model = mnet.influence(MLP, CE, params, x, y, preconditioner="diag")
    with pytest.raises(
        DataError, match=r"queries \(inputs \(2, 5\) float64.*do not match the training data \(inputs \(10, 4\)"
    ):
        model.scores(jnp.ones((2, 5)), y[:2])
    with pytest.raises(DataError, match="queries .*targets \\(2,\\) float64.* do not match"):
        model.scores(x[:2], jnp.ones(2))
    with pytest.raises(DataError, match="2 inputs but 3 targets"):
        model.scores(x[:2], y[:3])
    with pytest.raises(SettingError, match=r"k must be an int in \[1, 10\]"):
        model.top_k(x[:2], y[:2], 11)
    big = mnet.serial(mnet.Dense(200), mnet.Tanh(), mnet.Dense(3))
    big_params, bx, by = problem(7, n=4, net=big, shape=(60,))
    with pytest.raises(SettingError, match="at most 10000 parameters"):
        mnet.influence(big, CE, big_params, bx, by, preconditioner="ggn")


def test_a_padding_mask_equals_the_sequences_cut_to_their_tokens():
    """Causal decoder sequences padded after 4 of 6 positions: with the mask, every preconditioner's scores and
    self-influence equal those of the batch cut to 4 positions (the padding, its tokens random, counts for nothing);
    a mask of the wrong shape is refused by name."""
    net = mnet.models.gpt(11, 6, 8, 1, 2, num_kv_heads=1, hidden=12)
    _, params = net.init(jax.random.key(1), (6,), jnp.float64)
    rng = np.random.default_rng(1)
    # 8 sequences in chunks of 4, and 4 queries: every program is compiled for one shape (unequal chunks are
    # tested above)
    x, y = jnp.asarray(rng.integers(0, 11, (8, 6))), jnp.asarray(rng.integers(0, 11, (8, 6)))
    mask = jnp.broadcast_to(jnp.arange(6) < 4, (8, 6))
    for name in ("ekfac", "kfac", "diag", "identity", "ggn"):
        options = dict(preconditioner=name, kind="empirical", fallback="diag", damping=1e-3, batch_size=4)
        padded = mnet.influence(net, CE, params, x, y, mask=mask, **options)
        cut = mnet.influence(net, CE, params, x[:, :4], y[:, :4], **options)
        np.testing.assert_allclose(
            padded.scores(x[4:], y[4:], query_mask=mask[4:]), cut.scores(x[4:, :4], y[4:, :4]), rtol=1e-8, err_msg=name
        )
        np.testing.assert_allclose(padded.self_influence(), cut.self_influence(), rtol=1e-8, err_msg=name)
    with pytest.raises(DataError, match=r"mask must be booleans \(examples, T\), one row per example"):
        mnet.influence(net, CE, params, x, y, mask=mask[:5])
    with pytest.raises(DataError, match="query_mask must be booleans"):
        padded.scores(x[:3], y[:3], query_mask=jnp.ones((3, 6)))
