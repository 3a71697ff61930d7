"""Spectra on the hand-derived curvature products, against ``jnp.linalg.eigh`` of the dense Hessian (``jax.hessian``)
and GGN (``jax.jacrev`` and ``jax.hessian`` of each example's loss) of small networks: Lanczos' top eigenvalues,
Hutchinson's and Hutch++'s traces (unbiased, by a statistical test over many keys), the SLQ density (integrating to
one, its nodes inside the spectrum); blocks, chunked data, matfree's pin, no autodiff, and clear refusals."""

import importlib.metadata

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import mnet
from mnet.errors import SettingError
from tests.helpers import no_autodiff

CE = mnet.losses.softmax_cross_entropy


def problem(seed=0, n=40, net=None):
    net = net or mnet.serial(mnet.Dense(6), mnet.Tanh(), mnet.Dense(3))
    _, params = net.init(jax.random.key(seed), (4,), jnp.float64)
    rng = np.random.default_rng(seed)
    return net, params, jnp.asarray(rng.normal(size=(n, 4))), jnp.asarray(rng.integers(0, 3, n))


def dense_hessian(net, params, x, y):
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda f: CE.value(net.apply(unravel(f), x), y))(flat)


def dense_ggn(net, params, x, y):
    flat, unravel = ravel_pytree(params)
    J = jax.vmap(lambda xb: jax.jacrev(lambda f: net.apply(unravel(f), xb[None])[0])(flat))(x)
    H = jax.vmap(lambda o, t: jax.hessian(lambda u: CE.per_example(u[None], t[None])[0])(o))(net.apply(params, x), y)
    return jnp.einsum("bop,boq,bqr->pr", J, H, J) / x.shape[0]


def in_operator_order(matrix, params, names):
    """``matrix`` (in ``ravel_pytree``'s leaf order) restricted and reordered to the operator's leaves ``names``."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    offsets, start = {}, 0
    for path, leaf in leaves:
        offsets[jax.tree_util.keystr(path, simple=True, separator=".")] = np.arange(start, start + leaf.size)
        start += leaf.size
    index = np.concatenate([offsets[name] for name in names])
    return matrix[np.ix_(index, index)]


def test_matfree_is_the_pinned_version():
    assert importlib.metadata.version("matfree") == "0.6.3"


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_operator_and_lanczos_against_the_dense_curvature(curvature):
    net, params, x, y = problem()
    dense = (dense_hessian if curvature == "hessian" else dense_ggn)(net, params, x, y)
    op = mnet.spectrum.curvature_operator(net, CE, params, x, y, curvature=curvature, batch_size=16)
    np.testing.assert_allclose(in_operator_order(op.dense(), params, op.names), op.dense(), atol=0)
    np.testing.assert_allclose(op.dense(), in_operator_order(dense, params, op.names), atol=1e-13)
    expected = jnp.linalg.eigvalsh(dense)
    top = mnet.spectrum.top_eigenpairs(op, 4, key=jax.random.key(1))
    np.testing.assert_allclose(top.values, expected[::-1][:4], rtol=1e-6, atol=1e-9)
    residual = jax.vmap(op.matvec)(top.vectors) - top.values[:, None] * top.vectors
    assert float(jnp.max(jnp.abs(residual))) < 1e-6
    bottom = mnet.spectrum.top_eigenpairs(op, 2, key=jax.random.key(1), which="smallest", num_matvecs=op.size)
    np.testing.assert_allclose(bottom.values, expected[:2], rtol=1e-6, atol=1e-9)


def test_a_block_is_the_diagonal_block():
    net, params, x, y = problem(2)
    dense = dense_hessian(net, params, x, y)
    for block in ("0", "2.W"):
        op = mnet.spectrum.curvature_operator(net, CE, params, x, y, block=block)
        assert all(name == block or name.startswith(block + ".") for name in op.names)
        np.testing.assert_allclose(op.dense(), in_operator_order(dense, params, op.names), atol=1e-13)
        top = mnet.spectrum.top_eigenpairs(op, 2, key=jax.random.key(3))
        np.testing.assert_allclose(top.values, jnp.linalg.eigvalsh(op.dense())[::-1][:2], rtol=1e-6)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_estimates_are_unbiased(method):
    """The mean of 200 independent estimates lies within 4 standard errors of ``tr(H)`` (a false alarm about once
    in 16,000 runs; a biased estimator, or one scaled wrongly, is far outside)."""
    net, params, x, y = problem(3)
    op = mnet.spectrum.curvature_operator(net, CE, params, x, y)
    exact = float(jnp.trace(op.dense()))
    estimate = jax.jit(jax.vmap(lambda key: mnet.spectrum.trace(op, key=key, samples=12, method=method).value))
    values = np.asarray(estimate(jax.random.split(jax.random.key(4), 200)))
    assert abs(values.mean() - exact) < 4 * values.std(ddof=1) / np.sqrt(len(values))
    assert values.std() > 0


def test_the_density_integrates_to_one_and_sits_on_the_spectrum():
    net, params, x, y = problem(5)
    op = mnet.spectrum.curvature_operator(net, CE, params, x, y, curvature="ggn")
    density = mnet.spectrum.spectral_density(op, key=jax.random.key(6), probes=4, num_matvecs=30)
    np.testing.assert_allclose(jnp.trapezoid(density.density, density.grid), 1.0, rtol=1e-6)
    np.testing.assert_allclose(jnp.sum(density.weights, axis=1), 1.0, rtol=1e-12)
    eigenvalues = jnp.linalg.eigvalsh(op.dense())
    assert float(jnp.min(density.nodes)) >= float(eigenvalues[0]) - 1e-9
    assert float(jnp.max(density.nodes)) <= float(eigenvalues[-1]) + 1e-9
    np.testing.assert_allclose(jnp.max(density.nodes), eigenvalues[-1], rtol=1e-8)  # the extreme node converges first
    # SLQ's quadrature is exact for polynomials of low degree: the mean of the nodes is tr(C) / size in expectation,
    # and for one probe v it is v^T C v exactly.
    one = mnet.spectrum.spectral_density(op, key=jax.random.key(7), probes=1, num_matvecs=30)
    v = jax.random.rademacher(jax.random.key(7), (1, op.size), jnp.float64)[0]
    np.testing.assert_allclose(jnp.sum(one.nodes * one.weights), v @ op.matvec(v) / op.size, rtol=1e-10)


def test_spectra_run_without_autodiff():
    net, params, x, y = problem(6)
    op = mnet.spectrum.curvature_operator(net, CE, params, x, y)
    expected = mnet.spectrum.top_eigenpairs(op, 2, key=jax.random.key(0)).values
    with no_autodiff():
        for curvature in ("hessian", "ggn"):
            guarded = mnet.spectrum.curvature_operator(net, CE, params, x, y, curvature=curvature, batch_size=7)
            values = mnet.spectrum.top_eigenpairs(guarded, 2, key=jax.random.key(0)).values
            mnet.spectrum.trace(guarded, key=jax.random.key(1), samples=6, method="hutch++")
            mnet.spectrum.trace(guarded, key=jax.random.key(1), samples=6)
            mnet.spectrum.spectral_density(guarded, key=jax.random.key(2), probes=2, num_matvecs=8)
            if curvature == "hessian":
                np.testing.assert_allclose(values, expected, rtol=1e-10)


def test_spectra_refuse_bad_settings():
    net, params, x, y = problem(7, n=8)
    op = mnet.spectrum.curvature_operator(net, CE, params, x, y)
    with pytest.raises(SettingError, match=r"k = 52 is larger than the number of parameters in the operator \(51\)"):
        mnet.spectrum.top_eigenpairs(op, 52, key=jax.random.key(0))
    with pytest.raises(SettingError, match="smaller than k"):
        mnet.spectrum.top_eigenpairs(op, 5, key=jax.random.key(0), num_matvecs=3)
    with pytest.raises(SettingError, match="which must be one of"):
        mnet.spectrum.top_eigenpairs(op, 2, key=jax.random.key(0), which="top")
    with pytest.raises(SettingError, match="block '3' names no parameter; the parameters are 0.W, 0.b, 2.W, 2.b"):
        mnet.spectrum.curvature_operator(net, CE, params, x, y, block="3")
    with pytest.raises(SettingError, match="curvature must be one of"):
        mnet.spectrum.curvature_operator(net, CE, params, x, y, curvature="fisher")
    with pytest.raises(SettingError, match="samples must be an int >= 3"):
        mnet.spectrum.trace(op, key=jax.random.key(0), samples=2, method="hutch++")
    with pytest.raises(SettingError, match="sigma must be positive"):
        mnet.spectrum.spectral_density(op, key=jax.random.key(0), probes=2, num_matvecs=4, sigma=0.0)
