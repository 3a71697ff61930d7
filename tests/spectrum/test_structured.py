"""Structured curvature operators (a Kronecker product or an exact dense block per layer, held as
eigendecompositions) against dense matrices: the GGN built by autodiff (``jax.jacrev``, ``jax.hessian``), the Hessian
by ``jax.hessian``, and NumPy's inverse, ``slogdet`` and trace of the same matrices; products with a matrix of
vectors and over batches against the arrays; no autodiff; clear refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import mnet
from mnet.errors import SettingError
from tests.helpers import no_autodiff
from tests.spectrum.test_spectrum import CE, dense_ggn, dense_hessian, in_operator_order, problem


def check_functions(op, dense, damping=0.3, rtol=1e-10):
    """The operator's inverse, power, trace, log-determinant and norm against the dense matrix's."""
    eye = np.eye(op.size)
    np.testing.assert_allclose(op.dense(), dense, atol=1e-12 * np.abs(dense).max())
    np.testing.assert_allclose(op.inverse(damping).dense(), np.linalg.inv(dense + damping * eye), rtol=rtol, atol=1e-9)
    root = op.power(0.5, damping).dense()
    np.testing.assert_allclose(root @ root, dense + damping * eye, rtol=rtol, atol=1e-9)
    np.testing.assert_allclose(op.trace(), np.trace(dense), rtol=rtol)
    np.testing.assert_allclose(op.damped(damping).logdet(), np.linalg.slogdet(dense + damping * eye)[1], rtol=rtol)
    np.testing.assert_allclose(op.frobenius_norm(), np.linalg.norm(dense), rtol=rtol)
    np.testing.assert_allclose(op.inverse(damping).trace(), np.trace(np.linalg.inv(dense + damping * eye)), rtol=rtol)


def test_kflr_at_batch_one_is_the_ggn_block_diagonal():
    """At batch 1, ``kron(A, G)`` with the exact square root equals the GGN's block of each dense layer."""
    net, params, x, y = problem(0, n=1)
    op = mnet.spectrum.kronecker_operator(net, CE, params, x, y)
    assert op.block_names == ("0", "2") and op.names == ("0.W", "0.b", "2.W", "2.b")
    ggn = np.array(in_operator_order(dense_ggn(net, params, x, y), params, op.names))
    first = 4 * 6 + 6
    ggn[:first, first:] = ggn[first:, :first] = 0
    check_functions(op, ggn)


@pytest.mark.parametrize("kind", ["kflr", "empirical", "kfac"])
def test_kronecker_operator_over_a_dataset(kind):
    """Over 40 examples in chunks, or as batches: the Kronecker products of the whole data's factors."""
    net, params, x, y = problem(1)
    key = jax.random.key(5) if kind == "kfac" else None
    op = mnet.spectrum.kronecker_operator(net, CE, params, x, y, kind=kind, key=key)
    F = mnet.kfac_factors(net, CE, kind=kind)(params, x, y, key=key)
    dense = scipy.linalg.block_diag(*(np.kron(F[i]["A"], F[i]["G"]) for i in (0, 2)))
    check_functions(op, dense)
    if kind != "kfac":  # the draws of a chunk differ from the whole batch's
        chunked = mnet.spectrum.kronecker_operator(net, CE, params, x, y, kind=kind, batch_size=16)
        batched = mnet.spectrum.kronecker_operator(
            net, CE, params, kind=kind, batches=[(x[:25], y[:25]), (x[25:], y[25:])]
        )
        np.testing.assert_allclose(chunked.dense(), dense, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(batched.dense(), dense, rtol=1e-12, atol=1e-15)


def test_kronecker_operator_folds_a_convolutions_positions_into_G():
    """A convolution's block of the mean loss is ``P kron(A, G)`` (P windows per example, the convention of
    :func:`mnet.kfac_factors`); the operator holds that block, so its product is ``P`` times the factors'."""
    net = mnet.serial(mnet.Conv2D(3, (3, 3)), mnet.Relu(), mnet.Flatten(), mnet.Dense(2))
    _, params = net.init(jax.random.key(0), (5, 5, 2), jnp.float64)
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(6, 5, 5, 2))), jnp.asarray(rng.integers(0, 2, 6))
    op = mnet.spectrum.kronecker_operator(net, CE, params, x, y)
    F = mnet.kfac_factors(net, CE)(params, x, y)
    dense = scipy.linalg.block_diag(np.kron(F[0]["A"], 9 * F[0]["G"]), np.kron(F[3]["A"], F[3]["G"]))
    np.testing.assert_allclose(op.dense(), dense, rtol=1e-10, atol=1e-14)
    conv = op.inverse(0.1).dense()[: 3 * 3 * 2 * 3 + 3, : 3 * 3 * 2 * 3 + 3]
    np.testing.assert_allclose(conv, np.linalg.inv(dense[:57, :57] + 0.1 * np.eye(57)), rtol=1e-9)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_block_diagonal_is_the_exact_curvatures_blocks(curvature):
    net, params, x, y = problem(2)
    full = (dense_hessian if curvature == "hessian" else dense_ggn)(net, params, x, y)
    op = mnet.spectrum.block_diagonal(net, CE, params, x, y, curvature=curvature, batch_size=16)
    assert op.block_names == ("0", "2")
    dense = np.array(in_operator_order(full, params, op.names))
    first = 4 * 6 + 6
    dense[:first, first:] = dense[first:, :first] = 0
    check_functions(op, dense, damping=5.0 if curvature == "hessian" else 0.3)
    # An indefinite shift, halfway between two eigenvalues so that none is near zero: slogdet's sign and value.
    values = np.linalg.eigvalsh(dense)
    shift = -(values[40] + values[41]) / 2
    sign, logdet = op.damped(shift).slogdet()
    expected = np.linalg.slogdet(dense + shift * np.eye(op.size))
    assert expected[0] == (-1) ** 41 and sign == expected[0]
    np.testing.assert_allclose(logdet, expected[1], rtol=1e-10)
    top = mnet.spectrum.top_eigenpairs(op, 2, key=jax.random.key(0))
    np.testing.assert_allclose(top.values, np.sort(np.linalg.eigvalsh(dense))[::-1][:2], rtol=1e-8)


def test_named_blocks_and_batches():
    net, params, x, y = problem(3)
    full = np.array(in_operator_order(dense_hessian(net, params, x, y), params, ("2.b", "0.W")))
    op = mnet.spectrum.block_diagonal(
        net, CE, params, batches=lambda: iter([(x[:30], y[:30]), (x[30:], y[30:])]), blocks=["2.b", "0.W"]
    )
    assert op.names == ("2.b", "0.W") and op.size == 3 + 24
    full[:3, 3:] = full[3:, :3] = 0
    np.testing.assert_allclose(op.dense(), full, atol=1e-13)
    tree = op.to_tree(jnp.arange(op.size, dtype=jnp.float64))
    np.testing.assert_array_equal(tree[2]["b"], [0, 1, 2])
    assert float(jnp.abs(tree[0]["b"]).max()) == 0 and float(jnp.abs(tree[2]["W"]).max()) == 0
    np.testing.assert_array_equal(op.to_flat(tree), np.arange(op.size))


def test_products_with_a_matrix_of_vectors_and_over_batches():
    """``operator @ V`` for a ``(size, k)`` matrix is its columns' products; an operator over batches (of unequal
    sizes, one with a mask of its own) is the operator over the arrays."""
    net, params, x, y = problem(4)
    for curvature in ("hessian", "ggn"):
        op = mnet.spectrum.curvature_operator(net, CE, params, x, y, curvature=curvature)
        over = mnet.spectrum.curvature_operator(
            net, CE, params, curvature=curvature, batches=[(x[:7], y[:7]), (x[7:], y[7:])]
        )
        V = np.random.default_rng(0).normal(size=(op.size, 3))
        expected = np.stack([op.matvec(V[:, i]) for i in range(3)], axis=1)
        np.testing.assert_allclose(op @ V, expected, rtol=1e-12)
        np.testing.assert_allclose(over @ V, expected, rtol=1e-11)
        np.testing.assert_allclose(over @ V[:, 0], expected[:, 0], rtol=1e-11)
    with pytest.raises(
        SettingError, match=r"acts on vectors of 51 parameters, \(size,\) or \(size, k\); got an array of shape \(50,\)"
    ):
        op @ jnp.zeros(50)


def test_structured_operators_run_without_autodiff():
    net, params, x, y = problem(5)
    expected = mnet.spectrum.kronecker_operator(net, CE, params, x, y).inverse(0.1).dense()
    blocks = mnet.spectrum.block_diagonal(net, CE, params, x, y).damped(1.0).logdet()
    with no_autodiff():
        guarded = mnet.spectrum.kronecker_operator(net, CE, params, x, y, batch_size=16).inverse(0.1)
        np.testing.assert_allclose(guarded.dense(), expected, rtol=1e-10)
        op = mnet.spectrum.block_diagonal(net, CE, params, batches=[(x, y)], curvature="hessian")
        np.testing.assert_allclose(op.damped(1.0).logdet(), blocks, rtol=1e-10)
        mnet.spectrum.curvature_operator(net, CE, params, batches=[(x, y)]) @ jnp.ones((51, 2))


def test_structured_operators_refuse_bad_input():
    net, params, x, y = problem(6, n=8)
    with pytest.raises(SettingError, match="re-iterable"):
        mnet.spectrum.curvature_operator(net, CE, params, batches=iter([(x, y)]))
    with pytest.raises(SettingError, match="as x and targets or as batches=, not both"):
        mnet.spectrum.block_diagonal(net, CE, params, x, y, batches=[(x, y)])
    with pytest.raises(SettingError, match="pass the data as x and targets, or as batches="):
        mnet.spectrum.kronecker_operator(net, CE, params)
    with pytest.raises(SettingError, match=r"batch 0 must be a tuple \(x, targets\)"):
        mnet.spectrum.curvature_operator(net, CE, params, batches=[x])
    with pytest.raises(SettingError, match="overlap"):
        mnet.spectrum.block_diagonal(net, CE, params, x, y, blocks=["0", "0.W"])
    with pytest.raises(SettingError, match="pass key="):
        mnet.spectrum.kronecker_operator(net, CE, params, x, y, kind="kfac")
    normed = mnet.serial(mnet.Dense(6), mnet.LayerNorm(), mnet.Dense(3))
    _, p = normed.init(jax.random.key(0), (4,), jnp.float64)
    with pytest.raises(SettingError, match="the layers at 1 have parameters but no Kronecker factors"):
        mnet.spectrum.kronecker_operator(normed, CE, p, x, y)
    chosen = mnet.spectrum.kronecker_operator(normed, CE, p, x, y, block=("0", "2"))
    assert chosen.block_names == ("0", "2")
    with pytest.raises(SettingError, match="names no layer"):
        mnet.spectrum.kronecker_operator(net, CE, params, x, y, block="5")
