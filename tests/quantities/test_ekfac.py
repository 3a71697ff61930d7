"""EK-FAC against dense autodiff references: each layer's GGN block ``mean_b J_b^T H_b J_b`` from ``jax.jacrev`` and
``jax.hessian``, and the per-example gradients from ``jax.grad`` example by example, rotated into the eigenbases
(random orthogonal ones as well as the factors' own, since the correction must hold in any basis). Flat inputs,
positions (a convolution's windows, a sequence), attention's projections, an embedding, a gated MLP; the batch-1
identity with the exact block; no autodiff on the hand path."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnet
from mnet.core.paths import at_path, flatten_with_keys, replaced_at
from mnet.errors import SettingError
from mnet.quantities.ekfac import eigen_correction, eigenbases, ekfac_factors, is_eigen_block
from mnet.quantities.kronecker import is_factor_pair, stack_bias, unstack_bias
from tests.helpers import no_autodiff, random_targets

CE, MSE = mnet.losses.softmax_cross_entropy, mnet.losses.mse

NETWORKS = {  # name: (network, example shape, integer inputs)
    "mlp": (mnet.serial(mnet.Dense(5), mnet.Tanh(), mnet.Dense(4), mnet.LayerNorm(), mnet.Dense(3)), (6,), False),
    "conv": (
        mnet.serial(mnet.Conv2D(2, 3, stride=2, padding="SAME"), mnet.Tanh(), mnet.Flatten(), mnet.Dense(3)),
        (5, 5, 2),
        False,
    ),
    "attention": (
        mnet.serial(mnet.MultiHeadSelfAttention(2), mnet.GatedMLP(5, use_bias=False), mnet.Flatten(), mnet.Dense(3)),
        (3, 4),
        False,
    ),
    "embedding": (mnet.serial(mnet.Embedding(7, 4), mnet.Gelu(), mnet.Flatten(), mnet.Dense(3)), (3,), True),
    "lstm": (mnet.serial(mnet.LSTM(3), mnet.LastStep(), mnet.Dense(3)), (4, 2), False),
    "gru": (mnet.serial(mnet.GRU(3), mnet.Flatten(), mnet.Dense(3)), (3, 2), False),
}


def problem(name, loss, seed, batch=4):
    net, shape, ids = NETWORKS[name]
    rng = np.random.default_rng(seed)
    _, params = net.init(jax.random.key(seed), shape, jnp.float64)
    x = jnp.asarray(rng.integers(0, 7, (batch,) + shape)) if ids else jnp.asarray(rng.normal(size=(batch,) + shape))
    return net, params, x, random_targets(rng, loss, (batch, 3), jnp.float64)


def factor_entries(factors):
    return [(path, pair) for path, pair in flatten_with_keys(factors, is_leaf=is_factor_pair) if is_factor_pair(pair)]


def entry_function(net, params, path):
    """``f(flat [W; b], x) -> outputs`` with the entry at ``path`` replaced, and the entry's matrix."""
    entry = at_path(params, path)
    matrix = stack_bias(entry)

    def outputs(flat, x):
        return net.apply(replaced_at(params, path, unstack_bias(flat.reshape(matrix.shape), entry)), x)

    return outputs, matrix


def reference_ggn_block(net, loss, params, x, targets, path):
    """``mean_b J_b^T H_b J_b`` for the row-major ``[W; b]`` of the entry at ``path``: ``jax.jacrev`` and
    ``jax.hessian`` of each example's own loss."""
    outputs, matrix = entry_function(net, params, path)

    def one(x_b, t_b):
        J = jax.jacrev(lambda f: outputs(f, x_b[None]).reshape(-1))(matrix.reshape(-1))
        y = outputs(matrix.reshape(-1), x_b[None])
        H = jax.hessian(lambda o: loss.per_example(o.reshape(y.shape), t_b[None])[0])(y.reshape(-1))
        return J.T @ H @ J

    return jnp.mean(jax.vmap(one)(x, targets), axis=0)


def reference_empirical(net, loss, params, x, targets, *, path, QA, QG):
    """``mean_b (Q_A^T G_b Q_G)^2`` with ``G_b`` each example's gradient by ``jax.grad``."""
    outputs, matrix = entry_function(net, params, path)

    def one(x_b, t_b):
        g = jax.grad(lambda f: loss.per_example(outputs(f, x_b[None]), t_b[None])[0])(matrix.reshape(-1))
        return (QA.T @ g.reshape(matrix.shape) @ QG) ** 2

    return jnp.mean(jax.vmap(one)(x, targets), axis=0)


def random_orthogonal(rng, n):
    return jnp.linalg.qr(jnp.asarray(rng.normal(size=(n, n))))[0]


@pytest.mark.parametrize("name", list(NETWORKS))
def test_corrected_eigenvalues_are_the_blocks_diagonal_in_any_basis(name):
    """For ``kind="kflr"`` the correction is ``diag(Q^T GGN_block Q)``, ``Q = kron(Q_A, Q_G)``, in random
    orthogonal bases and in the factors' own; for ``"empirical"`` the rotated squared per-example gradients."""
    net, params, x, targets = problem(name, CE, 3)
    rng = np.random.default_rng(4)
    factors = mnet.kfac_factors(net, CE)(params, x, targets)
    random_bases = jax.tree_util.tree_map(
        lambda pair: {k: random_orthogonal(rng, v.shape[0]) for k, v in pair.items()} if is_factor_pair(pair) else pair,
        factors,
        is_leaf=lambda node: is_factor_pair(node) or node is None,
    )
    for bases in (random_bases, eigenbases(factors)):
        for kind in ("kflr", "empirical"):
            corrected = jax.jit(eigen_correction(net, CE, kind))(params, x, targets, bases)
            entries = factor_entries(bases)
            assert entries, name
            for path, basis in entries:
                QA, QG = basis["A"], basis["G"]
                if kind == "kflr":
                    Q = jnp.kron(QA, QG)
                    block = jax.jit(lambda p, xs, t, path=path: reference_ggn_block(net, CE, p, xs, t, path))(
                        params, x, targets
                    )
                    expected = jnp.diag(Q.T @ block @ Q).reshape(QA.shape[0], QG.shape[0])
                else:
                    reference = partial(reference_empirical, net, CE, path=path)
                    expected = jax.jit(lambda p, xs, t, qa, qg, r=reference: r(p, xs, t, QA=qa, QG=qg))(
                        params, x, targets, QA, QG
                    )
                np.testing.assert_allclose(at_path(corrected, path), expected, rtol=1e-10, atol=1e-14, err_msg=name)


@pytest.mark.parametrize("loss", [CE, MSE])
def test_at_batch_one_ekfac_is_the_exact_ggn_block(loss):
    net, params, x, targets = problem("mlp", loss, 5, batch=1)
    blocks = ekfac_factors(net, loss)(params, x, targets)
    assert blocks[1] == () and blocks[3] is None
    for index in (0, 2, 4):
        block = blocks[index]
        assert is_eigen_block(block)
        Q = jnp.kron(block["QA"], block["QG"])
        reconstructed = Q @ jnp.diag(block["S"].reshape(-1)) @ Q.T
        expected = reference_ggn_block(net, loss, params, x, targets, (index,))
        np.testing.assert_allclose(reconstructed, expected, rtol=1e-10, atol=1e-12)


def test_ekfac_bases_diagonalise_the_factors_and_kinds_share_one_sample():
    net, params, x, targets = problem("conv", CE, 6)
    factors = mnet.kfac_factors(net, CE)(params, x, targets)
    blocks = jax.jit(ekfac_factors(net, CE))(params, x, targets)
    for path, pair in factor_entries(factors):
        block = at_path(blocks, path)
        for name, factor in (("QA", pair["A"]), ("QG", pair["G"])):
            rotated = block[name].T @ factor @ block[name]
            np.testing.assert_allclose(rotated, jnp.diag(jnp.diag(rotated)), atol=1e-12)
    key = jax.random.key(2)
    sampled = ekfac_factors(net, CE, "kfac")(params, x, targets, key=key)
    bases = eigenbases(mnet.kfac_factors(net, CE, "kfac")(params, x, targets, key=key))
    again = eigen_correction(net, CE, "kfac")(params, x, targets, bases, key=key)
    np.testing.assert_allclose(sampled[3]["S"], again[3], rtol=1e-12)


def test_ekfac_runs_without_autodiff():
    net, params, x, targets = problem("attention", CE, 7)
    expected = ekfac_factors(net, CE)(params, x, targets)
    with no_autodiff():
        got = jax.jit(ekfac_factors(net, CE, "empirical"))(params, x, targets)
        again = jax.jit(ekfac_factors(net, CE))(params, x, targets)
    np.testing.assert_allclose(again[0]["q"]["S"], expected[0]["q"]["S"], rtol=1e-12)
    assert got[0]["o"]["S"].shape == (5, 4)


def test_ekfac_refuses_an_unknown_kind_and_a_missing_key():
    net, params, x, targets = problem("mlp", CE, 8)
    with pytest.raises(SettingError, match="kind must be one of"):
        ekfac_factors(net, CE, "exact")
    with pytest.raises(SettingError, match="pass key"):
        ekfac_factors(net, CE, "kfac")(params, x, targets)


def test_recurrent_factors_are_the_products_moments():
    """``A`` of ``W_ih`` is the mean of ``x_t x_t^T`` over examples and time steps and ``A`` of ``W_hh`` that of the
    previous states ``h_{t-1}`` (zero at ``t = 0``), from an independent run of the cell; the biases have None."""
    net, params, x, targets = problem("lstm", CE, 9)
    factors = mnet.kfac_factors(net, CE)(params, x, targets)
    assert factors[0]["b_ih"] is None and factors[0]["b_hh"] is None
    rows = x.reshape(-1, 2)
    np.testing.assert_allclose(factors[0]["W_ih"]["A"], rows.T @ rows / rows.shape[0], rtol=1e-12)
    states = mnet.LSTM(3).apply(params[0], x)  # (batch, T, hidden)
    previous = jnp.concatenate([jnp.zeros_like(states[:, :1]), states[:, :-1]], axis=1).reshape(-1, 3)
    np.testing.assert_allclose(factors[0]["W_hh"]["A"], previous.T @ previous / previous.shape[0], rtol=1e-10)
    assert factors[0]["W_ih"]["G"].shape == (12, 12)
