"""The Laplace approximation of a GPT (all weights and last layer; diag and kron) against a dense reference built by
autodiff: the GGN of the sequences' log-likelihood, ``sum_n sum_t J_nt^T (diag(p) - p p^T) J_nt`` over the labelled
positions, its evidence and its linearised predictive; padding against the examples one by one, unpadded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import mnet
from mnet.laplace import KronBlock
from tests.helpers import no_autodiff

VOCAB, T, N = 7, 4, 3
PAD = -1
LOSS = mnet.losses.SoftmaxCrossEntropy(ignore_index=PAD)
LENGTHS = [4, 3, 1]


def decoder(tie=False):
    net = mnet.models.gpt(VOCAB, T, 8, 1, 2, num_kv_heads=1, hidden=8, tie_embeddings=tie)
    _, params = net.init(jax.random.key(0), (T,), jnp.float64)
    rng = np.random.default_rng(1)  # away from the initialisation's symmetries (RMSNorm's unit scales)
    params = jax.tree_util.tree_map(lambda p: p * (1 + 0.3 * rng.standard_normal(p.shape)), params)
    return net, params


def sequences(lengths=LENGTHS, seed=2):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (len(lengths), T + 1))
    kept = np.arange(T)[None] < np.array(lengths)[:, None]
    return jnp.asarray(ids[:, :T]), jnp.asarray(np.where(kept, ids[:, 1:], PAD)), kept


def dense_ggn(net, params, x, y):
    """The GGN of ``-log p(D | theta)``: a sequence's log-likelihood sums over its labelled positions."""
    flat, unravel = ravel_pytree(params)
    jac = jax.jacrev(lambda p: net.apply(unravel(p), x))(flat)  # (N, T, V, P)
    p = jax.nn.softmax(net.apply(params, x), axis=-1)
    H = jax.vmap(jax.vmap(jnp.diag))(p) - p[..., :, None] * p[..., None, :]
    H = H * (y != PAD)[..., None, None]
    return jnp.einsum("ntkp,ntkj,ntjq->pq", jac, H, jac), jac


def log_likelihood(net, params, x, y):
    logp = jax.nn.log_softmax(net.apply(params, x), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(y, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(y != PAD, picked, 0))


def test_all_weights_diag_against_the_dense_ggn_evidence_and_predictive():
    net, params = decoder()
    x, y, _ = sequences()
    alpha = 0.4
    la = mnet.laplace(net, LOSS, params, x, y, prior_precision=alpha, batch_size=2)
    ggn, _ = dense_ggn(net, params, x, y)
    np.testing.assert_allclose(ravel_pytree(la.curvature)[0], jnp.diag(ggn), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(la.log_likelihood, log_likelihood(net, params, x, y), rtol=1e-12)
    precision = jnp.diag(ggn) + alpha
    flat = ravel_pytree(params)[0]
    evidence = la.log_likelihood - alpha / 2 * flat @ flat + flat.size / 2 * jnp.log(alpha)
    np.testing.assert_allclose(la.log_marginal_likelihood(), evidence - jnp.sum(jnp.log(precision)) / 2, rtol=1e-12)
    # the joint predictive over every (position, class) of a sequence: J Lambda^-1 J^T
    x_new = sequences([T, T], seed=3)[0]
    f, cov = la.functional_covariance(x_new)
    _, jac = dense_ggn(net, params, x_new, jnp.zeros_like(x_new))
    jac = jac.reshape(2, T * VOCAB, -1)
    np.testing.assert_allclose(f, net.apply(params, x_new), rtol=1e-12)
    np.testing.assert_allclose(cov, jnp.einsum("bkp,p,bjp->bkj", jac, 1 / precision, jac), rtol=1e-9, atol=1e-12)
    probs = la.predict(x_new)
    assert probs.shape == (2, T, VOCAB)
    np.testing.assert_allclose(probs.sum(-1), 1, rtol=1e-12)
    # the held-out NLL sums a sequence's labelled positions
    labels = jnp.asarray(
        np.where([[True] * T, [True, True, False, False]], np.arange(2 * T).reshape(2, T) % VOCAB, PAD)
    )
    expected = (
        -jnp.sum(
            jnp.where(
                labels != PAD, jnp.log(jnp.take_along_axis(probs, jnp.maximum(labels, 0)[..., None], -1)[..., 0]), 0
            )
        )
        / 2
    )
    np.testing.assert_allclose(la.predictive_nll(x_new, labels), expected, rtol=1e-12)


def test_kron_and_last_layer_on_a_gpt():
    net, params = decoder()
    x, y, _ = sequences([T] * N)
    la = mnet.laplace(net, LOSS, params, x, y, structure="kron")
    factors = mnet.kfac_factors(net, LOSS)(params, x, y)
    # every dense-like entry is N P kron(A, G) with G of the sequence's log-likelihood, T times the loss's
    blocks = {"embedding": (la.entries[0], factors[0]), "q": (la.entries[1][1]["q"], factors[1][1]["q"])}
    blocks |= {"W_up": (la.entries[2][1]["W_up"], factors[2][1]["W_up"]), "read-out": (la.entries[4], factors[4])}
    for name, (entry, pair) in blocks.items():
        assert isinstance(entry, KronBlock), name
        expected = np.sort(np.linalg.eigvalsh(N * T * np.kron(pair["A"], T * pair["G"])))
        np.testing.assert_allclose(np.sort(np.outer(entry.A_vals, entry.G_vals).ravel()), expected, atol=1e-10)
    assert la.entries[1][0] is None and la.eigenvalues().size == la.n_params  # RMSNorm keeps its diagonal
    # the last layer alone: its block of the all-weights posterior, the features held fixed
    last = mnet.laplace(net, LOSS, params, x, y, structure="kron", subset="last_layer")
    assert last.subset == "last_layer" and last.n_params == params[-1]["W"].size
    np.testing.assert_allclose(last.entries[0].G_vals, la.entries[4].G_vals, rtol=1e-10)
    last_diag = mnet.laplace(net, LOSS, params, x, y, subset="last_layer", prior_precision=0.7)
    full_diag = mnet.laplace(net, LOSS, params, x, y, prior_precision=0.7)
    np.testing.assert_allclose(last_diag.curvature[0]["W"], full_diag.curvature[-1]["W"], rtol=1e-12)
    np.testing.assert_allclose(last_diag.log_likelihood, full_diag.log_likelihood, rtol=1e-12)
    # its predictive: the read-out's Jacobian (the features h, one per position) against its posterior block
    _, jac = dense_ggn(net, params, x[:2], y[:2])
    head = jac.reshape(2, T * VOCAB, -1)[:, :, -params[-1]["W"].size :]
    variance = 1 / (full_diag.curvature[-1]["W"].reshape(-1) + 0.7)
    f, cov = last_diag.functional_covariance(x[:2])
    np.testing.assert_allclose(f, net.apply(params, x[:2]), rtol=1e-12)
    np.testing.assert_allclose(cov, jnp.einsum("bkp,p,bjp->bkj", head, variance, head), rtol=1e-9, atol=1e-13)
    assert last_diag.predict(x[:2], link="sampled", samples=2, key=jax.random.key(0)).shape == (2, T, VOCAB)
    tied, tied_params = decoder(tie=True)
    with pytest.raises(mnet.SettingError, match=r"Tied.*at position \[0\].*tied to the embedding.*subset='all'"):
        mnet.laplace(tied, LOSS, tied_params, x, y, subset="last_layer")
    with pytest.raises(mnet.SettingError, match="subset must be one of"):
        mnet.laplace(net, LOSS, params, x, y, subset="first_layer")


def test_a_padded_batch_is_the_sum_of_its_sequences_alone_and_runs_without_autodiff():
    """A causal decoder's first ``L`` positions do not see the rest, so a sequence padded after ``L`` tokens has
    the curvature and likelihood of its ``L`` tokens alone, and the batch's are the sums."""
    net, params = decoder(tie=True)
    x, y, _ = sequences()
    with no_autodiff():
        la = mnet.laplace(net, LOSS, params, x, y, structure="kron")
        la.log_marginal_likelihood().block_until_ready()
        la.predict(x[:1]).block_until_ready()
    alone = [mnet.laplace(net, LOSS, params, x[b : b + 1, :n], y[b : b + 1, :n]) for b, n in enumerate(LENGTHS)]
    curvature = jax.tree_util.tree_map(lambda *d: sum(d), *(a.curvature for a in alone))
    np.testing.assert_allclose(ravel_pytree(la.curvature)[0], ravel_pytree(curvature)[0], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(la.log_likelihood, sum(a.log_likelihood for a in alone), rtol=1e-12)
    assert la.entries[0]["embedding"] is None  # the tied table: no Kronecker factors, its diagonal instead


def encoder():
    """Not causal: without the mask a padded key would reach every query, so a padded position would count."""
    attention = mnet.MultiHeadSelfAttention(2, num_kv_heads=1, rope_base=50.0)
    net = mnet.serial(
        mnet.Embedding(VOCAB, 8), mnet.residual(mnet.serial(mnet.RMSNorm(), attention)), mnet.Silu(), mnet.Dense(VOCAB)
    )
    _, params = net.init(jax.random.key(3), (T,), jnp.float64)
    rng = np.random.default_rng(4)
    return net, jax.tree_util.tree_map(lambda p: p * (1 + 0.3 * rng.standard_normal(p.shape)), params)


def test_a_padded_non_causal_batch_is_its_sequences_alone_unpadded():
    """``laplace(mask=)``: the diag curvature and likelihood of a padded batch are the sums of each sequence's own,
    unpadded and unmasked; with every sequence of one length ``L``, the kron fit and the predictive equal those of the
    batch cut to ``L`` positions."""
    net, params = encoder()
    ids = jnp.asarray(np.random.default_rng(5).integers(0, VOCAB, (N, T)))
    labels = jnp.asarray(np.random.default_rng(6).integers(0, VOCAB, (N, T)))
    mask = jnp.arange(T)[None] < jnp.asarray(LENGTHS)[:, None]
    la = mnet.laplace(net, mnet.losses.softmax_cross_entropy, params, ids, labels, mask=mask, batch_size=2)
    alone = [
        mnet.laplace(net, mnet.losses.softmax_cross_entropy, params, ids[b : b + 1, :n], labels[b : b + 1, :n])
        for b, n in enumerate(LENGTHS)
    ]
    curvature = jax.tree_util.tree_map(lambda *d: sum(d), *(a.curvature for a in alone))
    np.testing.assert_allclose(ravel_pytree(la.curvature)[0], ravel_pytree(curvature)[0], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(la.log_likelihood, sum(a.log_likelihood for a in alone), rtol=1e-12)
    unmasked = mnet.laplace(net, mnet.losses.softmax_cross_entropy, params, ids, labels)
    assert abs(float(unmasked.log_likelihood - la.log_likelihood)) > 1e-3  # the mask changed something
    # one length for all: the masked kron fit, predictive and held-out NLL are the cut batch's
    L = 3
    cut_mask = jnp.broadcast_to(jnp.arange(T) < L, (N, T))
    with no_autodiff():
        padded = mnet.laplace(
            net, mnet.losses.softmax_cross_entropy, params, ids, labels, structure="kron", mask=cut_mask
        ).with_prior_precision(0.5)
        f, cov = padded.functional_covariance(ids, mask=cut_mask)
        nll = padded.predictive_nll(ids, labels, mask=cut_mask)
    cut = mnet.laplace(
        net, mnet.losses.softmax_cross_entropy, params, ids[:, :L], labels[:, :L], structure="kron"
    ).with_prior_precision(0.5)
    np.testing.assert_allclose(padded.eigenvalues(), cut.eigenvalues(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(padded.log_marginal_likelihood(), cut.log_marginal_likelihood(), rtol=1e-12)
    f_cut, cov_cut = cut.functional_covariance(ids[:, :L])
    np.testing.assert_allclose(f[:, :L], f_cut, rtol=1e-12)
    first = L * VOCAB  # the (position, class) entries of the first L positions
    np.testing.assert_allclose(cov[:, :first, :first], cov_cut, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(nll, cut.predictive_nll(ids[:, :L], labels[:, :L]), rtol=1e-12)
    sampled = padded.predict(ids, link="sampled", samples=3, key=jax.random.key(0), mask=cut_mask)
    np.testing.assert_allclose(sampled[:, :L].sum(-1), 1, rtol=1e-12)
    with pytest.raises(mnet.SettingError, match="mask must hold one row of booleans per example, 3 in all"):
        mnet.laplace(net, mnet.losses.softmax_cross_entropy, params, ids, labels, mask=mask[:2])
