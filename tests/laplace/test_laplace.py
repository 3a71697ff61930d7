"""The Laplace approximation against independent references: the closed-form posterior, evidence and predictive of
Bayesian linear regression (where every step of the approximation is exact), a dense GGN built by autodiff
(``jax.jacrev`` and ``jax.hessian``), a grid search over the prior precision, and the hand path under the guard that
makes autodiff unusable."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import mnet
from mnet.laplace import KronBlock
from mnet.laplace.fit import fit_chunk
from mnet.laplace.predictive import normal_like
from tests.helpers import load_experiment, no_autodiff

CE, MSE, BCE = mnet.losses.softmax_cross_entropy, mnet.losses.mse, mnet.losses.sigmoid_binary_cross_entropy


def linear_regression(n=20, d=3, k=2, alpha=0.7, sigma=0.5):
    """A linear model at its exact MAP: ``theta* = (X~^T X~ / sigma^2 + alpha I)^-1 X~^T Y / sigma^2``."""
    x = jax.random.normal(jax.random.key(1), (n, d))
    y = x @ jax.random.normal(jax.random.key(2), (d, k)) + 0.3 * jax.random.normal(jax.random.key(3), (n, k))
    xt = jnp.concatenate([x, jnp.ones((n, 1))], axis=1)
    precision = xt.T @ xt / sigma**2 + alpha * jnp.eye(d + 1)
    stacked = jnp.linalg.solve(precision, xt.T @ y / sigma**2)
    return mnet.Dense(k), {"W": stacked[:-1], "b": stacked[-1]}, x, y, xt, precision


def dense_posterior_covariance(la):
    """``R R^T`` from :meth:`Laplace.scale_by_root` applied to every unit vector: the posterior covariance."""
    flat, unravel = ravel_pytree(la.params)
    root = jax.vmap(lambda e: ravel_pytree(la.scale_by_root(unravel(e)))[0])(jnp.eye(flat.size)).T
    return root @ root.T


def test_linear_gaussian_kron_is_the_exact_posterior_evidence_and_predictive():
    alpha, sigma = 0.7, 0.5
    net, params, x, y, xt, precision = linear_regression(alpha=alpha, sigma=sigma)
    la = mnet.laplace(net, MSE, params, x, y, structure="kron", prior_precision=alpha, sigma_noise=sigma)
    covariance = jnp.linalg.inv(precision)  # the same for each output column; rows of [W; b] are inputs
    k = y.shape[1]
    # the posterior over vec_row([W; b]) is kron(covariance, I_k)
    np.testing.assert_allclose(dense_posterior_covariance(la), jnp.kron(covariance, jnp.eye(k)), atol=1e-12)
    variance = la.posterior_variance()
    np.testing.assert_allclose(variance["W"], jnp.diag(covariance)[:-1, None] * jnp.ones(k), rtol=1e-12)
    np.testing.assert_allclose(variance["b"], jnp.full(k, covariance[-1, -1]), rtol=1e-12)
    # evidence: each output column is y_j ~ N(0, sigma^2 I + X~ X~^T / alpha)
    marginal = sigma**2 * jnp.eye(x.shape[0]) + xt @ xt.T / alpha
    exact = sum(jax.scipy.stats.multivariate_normal.logpdf(y[:, j], jnp.zeros(x.shape[0]), marginal) for j in range(k))
    np.testing.assert_allclose(la.log_marginal_likelihood(), exact, rtol=1e-12)
    # predictive: mean x~ theta*, variance x~ Sigma x~^T + sigma^2
    x_new = jax.random.normal(jax.random.key(4), (7, x.shape[1]))
    xt_new = jnp.concatenate([x_new, jnp.ones((7, 1))], axis=1)
    mean, var = la.predict(x_new, batch_size=3)
    np.testing.assert_allclose(mean, net.apply(params, x_new), rtol=1e-12)
    expected = jnp.einsum("bi,ij,bj->b", xt_new, covariance, xt_new)[:, None] + sigma**2
    np.testing.assert_allclose(var, jnp.broadcast_to(expected, var.shape), rtol=1e-12)
    sampled_mean, sampled_var = la.predict(x_new, link="sampled", samples=4000, key=jax.random.key(5))
    np.testing.assert_allclose(sampled_mean, mean, atol=4 * jnp.sqrt(var.max() / 4000))
    np.testing.assert_allclose(sampled_var, var, rtol=0.15)


def test_linear_gaussian_diag_is_the_diagonal_of_the_exact_precision():
    alpha, sigma = 2.0, 0.8
    net, params, x, y, _, precision = linear_regression(alpha=alpha, sigma=sigma, k=3)
    la = mnet.laplace(net, MSE, params, x, y, prior_precision=alpha, sigma_noise=sigma, batch_size=7)
    diagonal = jnp.diag(precision) - alpha
    np.testing.assert_allclose(la.curvature["W"], diagonal[:-1, None] * jnp.ones(3), rtol=1e-12)
    np.testing.assert_allclose(la.curvature["b"], jnp.full(3, diagonal[-1]), rtol=1e-12)
    np.testing.assert_allclose(la.posterior_variance()["b"], 1 / jnp.full(3, jnp.diag(precision)[-1]), rtol=1e-12)


def classifier(loss=CE, outputs=3, seed=0, n=9):
    net = mnet.serial(mnet.Dense(4), mnet.Tanh(), mnet.Dense(outputs))
    _, params = net.init(jax.random.key(seed), (3,))
    x = jax.random.normal(jax.random.key(seed + 1), (n, 3))
    if loss is CE:
        y = jax.random.randint(jax.random.key(seed + 2), (n,), 0, outputs)
    else:
        y = jax.random.uniform(jax.random.key(seed + 2), (n, outputs))
    return net, params, x, y


def dense_ggn(net, loss, params, x, y, scale):
    """``s sum_n J_n^T H_n J_n`` from autodiff: the reference curvature."""
    flat, unravel = ravel_pytree(params)
    jac = jax.jacrev(lambda p: net.apply(unravel(p), x))(flat)  # (n, K, P)
    hess = jax.vmap(jax.hessian(lambda o, t: loss.per_example(o[None], t[None])[0]))(net.apply(params, x), y)
    return scale * jnp.einsum("nkp,nkj,njq->pq", jac, hess, jac), jac


def dense_kron_precision(la, ggn_diagonal):
    """The ``"kron"`` posterior precision as a dense matrix over ravelled params: each Dense layer's block
    ``kron(U diag(a) U^T, V diag(g) V^T)`` on ``[W; b]`` (mapped back to the ``W``, ``b`` leaves' order)."""
    flat, unravel = ravel_pytree(la.params)
    size = flat.size
    blocks = []
    for index, entry in enumerate(la.entries):
        if isinstance(entry, KronBlock):
            A = entry.A_vecs * entry.A_vals @ entry.A_vecs.T
            G = entry.G_vecs * entry.G_vals @ entry.G_vecs.T
            blocks.append((index, jnp.kron(A, G)))
    # a permutation from vec_row([W; b]) to the ravelled leaves, built from a params-shaped index tree
    positions = unravel(jnp.arange(size, dtype=flat.dtype))
    precision = jnp.diag(ravel_pytree(ggn_diagonal)[0])
    for index, block in blocks:
        order = jnp.concatenate([positions[index]["W"], positions[index]["b"][None]]).reshape(-1).astype(int)
        precision = precision.at[jnp.ix_(order, order)].set(block)
    return precision + la.prior_precision * jnp.eye(size)


@pytest.mark.parametrize("structure, loss", [("diag", CE), ("kron", CE), ("kron", BCE)])
def test_curvature_evidence_and_predictive_against_a_dense_autodiff_ggn(structure, loss):
    net, params, x, y = classifier(loss)
    la = mnet.laplace(net, loss, params, x, y, structure=structure, prior_precision=0.3, batch_size=4)
    scale = 1.0 if loss is CE else 3.0  # the sigmoid loss averages over its 3 units
    ggn, jac = dense_ggn(net, loss, params, x, y, scale)
    np.testing.assert_allclose(ravel_pytree(la.curvature)[0], jnp.diag(ggn), rtol=1e-10, atol=1e-14)
    if structure == "diag":
        precision = jnp.diag(jnp.diag(ggn)) + 0.3 * jnp.eye(ggn.shape[0])
    else:
        precision = dense_kron_precision(la, la.curvature)
        # the Kronecker block is N kron(A, G) from kfac_factors (K-FLR, exact square root)
        factors = mnet.kfac_factors(net, loss)(params, x, y)
        for entry, pair in zip(la.entries, factors):
            if isinstance(entry, KronBlock):
                expected = np.sort(np.linalg.eigvalsh(x.shape[0] * scale * np.kron(pair["A"], pair["G"])))
                np.testing.assert_allclose(np.sort(np.outer(entry.A_vals, entry.G_vals).ravel()), expected, atol=1e-10)
    covariance = jnp.linalg.inv(precision)
    np.testing.assert_allclose(dense_posterior_covariance(la), covariance, rtol=1e-9, atol=1e-12)
    # evidence from the dense precision
    loglik = -scale * jnp.sum(loss.per_example(net.apply(params, x), y))
    sq_norm = jnp.sum(ravel_pytree(params)[0] ** 2)
    size = precision.shape[0]
    reference = loglik - 0.15 * sq_norm + size / 2 * jnp.log(0.3) - jnp.linalg.slogdet(precision)[1] / 2
    np.testing.assert_allclose(la.log_marginal_likelihood(), reference, rtol=1e-10)
    # the linearised predictive's covariance J Sigma J^T
    x_new = jax.random.normal(jax.random.key(7), (5, 3))
    jac_new = jax.jacrev(lambda p: net.apply(ravel_pytree(params)[1](p), x_new))(ravel_pytree(params)[0])
    f, cov = la.functional_covariance(x_new, batch_size=2)
    np.testing.assert_allclose(f, net.apply(params, x_new), rtol=1e-12)
    np.testing.assert_allclose(cov, jnp.einsum("bkp,pq,bjq->bkj", jac_new, covariance, jac_new), rtol=1e-9, atol=1e-13)


def test_prior_precision_optimum_matches_a_grid_search():
    net, params, x, y = classifier(CE, n=30, seed=3)
    for structure in ("diag", "kron"):
        la = mnet.laplace(net, CE, params, x, y, structure=structure)
        fitted = la.optimize_prior_precision()
        grid = jnp.logspace(-4, 4, 4001)  # steps of 0.2% in alpha
        values = jax.vmap(la.log_marginal_likelihood)(grid)
        best = grid[jnp.argmax(values)]
        assert abs(np.log(fitted.prior_precision / best)) <= np.log(grid[1] / grid[0])
        assert fitted.log_marginal_likelihood() >= values.max() - 1e-9
        # the dense reference evidence peaks at the same place
        ggn, _ = dense_ggn(net, CE, params, x, y, 1.0)
        if structure == "diag":
            eig = jnp.diag(ggn)
            dense = jax.vmap(lambda a: jnp.sum(jnp.log(eig + a)))(grid)  # noqa: B023 (called at once, in this iteration)
            loglik = -jnp.sum(CE.per_example(net.apply(params, x), y))
            sq = jnp.sum(ravel_pytree(params)[0] ** 2)
            reference = loglik - grid / 2 * sq + eig.size / 2 * jnp.log(grid) - dense / 2
            np.testing.assert_allclose(values, reference, rtol=1e-10)


def test_predictive_probabilities_sum_to_one_and_sampling_is_the_linearised_model():
    net, params, x, y = classifier(CE, outputs=4, n=12)
    x_new = jax.random.normal(jax.random.key(9), (6, 3))
    for structure in ("diag", "kron"):
        la = mnet.laplace(net, CE, params, x, y, structure=structure, prior_precision=0.5)
        probit = la.predict(x_new)
        key = jax.random.key(11)
        sampled = la.predict(x_new, link="sampled", samples=16, key=key, batch_size=6)
        plug_in = la.predict(x_new, link="map")
        for probs in (probit, sampled, plug_in):
            assert probs.shape == (6, 4) and bool(jnp.all(probs >= 0))
            np.testing.assert_allclose(jnp.sum(probs, axis=1), 1.0, rtol=1e-12)
        np.testing.assert_allclose(plug_in, jax.nn.softmax(net.apply(params, x_new)), rtol=1e-12)
        # the sampled predictive: the same draws pushed through autodiff's dense Jacobian
        flat, unravel = ravel_pytree(params)
        jac = jax.jacrev(lambda p: net.apply(unravel(p), x_new))(flat)  # noqa: B023 (called at once, in this iteration)
        keys = jax.random.split(jax.random.fold_in(key, 0), 16)
        draws = [ravel_pytree(la.scale_by_root(normal_like(k, params)))[0] for k in keys]
        f = net.apply(params, x_new)
        expected = sum(jax.nn.softmax(f + jac @ d) for d in draws) / 16
        np.testing.assert_allclose(sampled, expected, rtol=1e-10)


def test_sigmoid_and_regression_predictives_have_the_outputs_shape():
    net, params, x, y = classifier(BCE, outputs=2)
    la = mnet.laplace(net, BCE, params, x, y, structure="kron")
    probs = la.predict(x[:3])
    assert probs.shape == (3, 2) and bool(jnp.all((probs > 0) & (probs < 1)))
    sampled = la.predict(x[:3], link="sampled", samples=8, key=jax.random.key(0))
    assert sampled.shape == (3, 2) and bool(jnp.all((sampled > 0) & (sampled < 1)))


def test_convolution_blocks_count_every_window_position():
    net = mnet.serial(mnet.Reshape((5, 5, 1)), mnet.Conv2D(2, 3), mnet.Tanh(), mnet.Flatten(), mnet.Dense(3))
    _, params = net.init(jax.random.key(0), (25,))
    x = jax.random.normal(jax.random.key(1), (4, 25))
    y = jnp.array([0, 1, 2, 0])
    la = mnet.laplace(net, CE, params, x, y, structure="kron")
    factors = mnet.kfac_factors(net, CE)(params, x, y)
    conv = la.entries[1]
    positions = 3 * 3  # a 3x3 kernel on 5x5, "VALID": 3x3 windows
    expected = np.sort(np.linalg.eigvalsh(4 * positions * np.kron(factors[1]["A"], factors[1]["G"])))
    np.testing.assert_allclose(np.sort(np.outer(conv.A_vals, conv.G_vals).ravel()), expected, atol=1e-10)
    assert la.predict(x).shape == (4, 3)


def test_layers_without_kronecker_structure_keep_their_diagonal():
    net = mnet.serial(mnet.Dense(4), mnet.LayerNorm(), mnet.Dense(3))
    _, params = net.init(jax.random.key(0), (3,))
    x, y = jax.random.normal(jax.random.key(1), (6, 3)), jnp.arange(6) % 3
    la = mnet.laplace(net, CE, params, x, y, structure="kron", prior_precision=0.5)
    assert la.entries[1] is None and isinstance(la.entries[0], KronBlock)
    variance = la.posterior_variance()
    np.testing.assert_allclose(variance[1]["gamma"], 1 / (la.curvature[1]["gamma"] + 0.5), rtol=1e-12)
    assert la.eigenvalues().size == la.n_params


def test_the_diagonal_fit_never_holds_a_jacobian_and_grows_with_the_outputs_by_activations_only():
    """XLA's memory analysis of the compiled fit: with 100 outputs it is far below one per-output Jacobian of the
    batch (``batch x outputs x parameters``, what a Jacobian-based diagonal needs); each further output costs at most
    a few of the batch's activations (the loss Hessian's square-root column carried down), not a parameter copy."""
    batch, widths = 32, (64, 256)

    def temporary(outputs):
        net = mnet.serial(mnet.Dense(widths[1]), mnet.Relu(), mnet.Dense(outputs))
        _, params = net.init(jax.random.key(0), (widths[0],), dtype=jnp.float32)
        x, y = jnp.ones((batch, widths[0]), jnp.float32), jnp.zeros((batch,), jnp.int32)
        compiled = fit_chunk.lower(net, CE, "diag", None, params, x, y, None, 1.0).compile()
        return compiled.memory_analysis().temp_size_in_bytes, sum(p.size for p in jax.tree_util.tree_leaves(params))

    small, _ = temporary(50)
    large, n_params = temporary(100)
    assert 0 < large < batch * 100 * n_params * 4 / 50
    per_output = (large - small) / 50
    assert per_output < 3 * batch * (widths[1] + 100) * 4
    assert per_output < n_params * 4


def test_the_predictive_holds_one_layers_block_of_the_jacobian_not_the_whole():
    """XLA's memory analysis of the compiled functional covariance: the same from 4 to 8 hidden layers (a few of one
    layer's per-example blocks, ``outputs x batch x 65 x 64``), so at depth 8 well under the whole Jacobian."""
    from mnet.laplace.predictive import batch_functional_covariance

    x, y = jnp.ones((32, 64), jnp.float32), jnp.zeros((32,), jnp.int32)
    for structure in ("diag", "kron"):
        temporary = {}
        for depth in (4, 8):
            net = mnet.mlp([64] * depth + [10])
            _, params = net.init(jax.random.key(0), (64,), dtype=jnp.float32)
            la = mnet.laplace(net, CE, params, x, y, structure=structure)
            compiled = batch_functional_covariance.lower(
                net, la.entries, la.curvature, params, x, la.prior_precision
            ).compile()
            temporary[depth] = compiled.memory_analysis().temp_size_in_bytes
        jacobian_bytes = 32 * 10 * sum(p.size for p in jax.tree_util.tree_leaves(params)) * 4
        assert 0 < temporary[8] <= 1.1 * temporary[4], (structure, temporary)
        assert temporary[8] < 0.8 * jacobian_bytes, (structure, temporary, jacobian_bytes)


def test_fit_evidence_and_predictive_run_without_autodiff():
    net, params, x, y = classifier(CE, n=10)
    with no_autodiff():  # "kron" runs the diagonal fit too (for layers without factors)
        la = mnet.laplace(net, CE, params, x, y, structure="kron").optimize_prior_precision()
        la.log_marginal_likelihood().block_until_ready()
        la.predict(x).block_until_ready()
        la.predict(x, link="sampled", samples=3, key=jax.random.key(0)).block_until_ready()
        la.posterior_variance()
        la.sample(jax.random.key(1), 2)
        net_r, params_r, x_r, y_r, _, _ = linear_regression()
        mnet.laplace(net_r, MSE, params_r, x_r, y_r).predict(x_r)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(structure="full"), "structure must be one of"),
        (dict(prior_precision=0.0), "prior_precision must be a positive number"),
        (dict(sigma_noise=-1.0), "sigma_noise must be a positive number"),
        (dict(mc_samples=2), "pass key="),
        (dict(batch_size=0), "batch_size must be a positive int"),
    ],
)
def test_bad_settings_are_refused(options, message):
    net, params, x, y = classifier(CE)
    with pytest.raises(ValueError, match=message):
        mnet.laplace(net, CE, params, x, y, **options)


def test_bad_data_losses_and_networks_are_refused():
    net, params, x, y = classifier(CE)
    with pytest.raises(ValueError, match=r"same number .* x \(9, 3\) and targets \(8,\)"):
        mnet.laplace(net, CE, params, x, y[:8])

    class Hinge(mnet.losses.Loss):
        name = "hinge"

    with pytest.raises(ValueError, match="has no known likelihood"):
        mnet.laplace(net, Hinge(), params, x, y)
    layer_norm_only = mnet.serial(mnet.LayerNorm())
    _, ln_params = layer_norm_only.init(jax.random.key(0), (3,))
    with pytest.raises(ValueError, match="no layer with Kronecker factors"):
        mnet.laplace(layer_norm_only, CE, ln_params, x, y, structure="kron")
    la = mnet.laplace(net, CE, params, x, y)
    with pytest.raises(ValueError, match="link must be one of"):
        la.predict(x, link="mc")
    with pytest.raises(ValueError, match="pass key="):
        la.predict(x, link="sampled")


def test_monte_carlo_curvature_is_unbiased_in_the_mean():
    net, params, x, y = classifier(CE, n=6)
    exact = mnet.laplace(net, CE, params, x, y)
    draws = [
        ravel_pytree(mnet.laplace(net, CE, params, x, y, mc_samples=50, key=jax.random.key(i)).curvature)[0]
        for i in range(8)
    ]
    estimate = sum(draws) / len(draws)
    np.testing.assert_allclose(estimate, ravel_pytree(exact.curvature)[0], rtol=0.2, atol=0.02)


def test_laplace_digits_experiment_quick(tmp_path):
    """``experiments/laplace_digits.py --quick``: every method's probabilities sum to one, the metrics are in range,
    the ECE matches its definition on the returned probabilities, Laplace is less certain than MAP out of
    distribution, and the plot is written."""
    module = load_experiment("laplace_digits")
    with jax.enable_x64(False):
        results = module.main(["--quick", "--out", str(tmp_path)])
    assert set(results) == {
        "MAP",
        "LA diag, evidence",
        "LA diag, validation",
        "LA kron, evidence",
        "LA kron, validation",
    }
    labels = np.asarray(mnet.data.load_digits(0).y_test)
    for name, r in results.items():
        probs = r["probabilities"]
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        assert 0.8 < r["accuracy"] <= 1 and 0 <= r["ece"] <= 1 and r["nll"] > 0
        confidence = probs.max(axis=1)
        bins = np.minimum((confidence * module.BINS).astype(int), module.BINS - 1)
        correct = probs.argmax(axis=1) == labels
        ece = sum(
            abs(correct[bins == b].mean() - confidence[bins == b].mean()) * np.mean(bins == b)
            for b in range(module.BINS)
            if np.any(bins == b)
        )
        np.testing.assert_allclose(r["ece"], ece, rtol=1e-6, atol=1e-9)
        if name != "MAP":
            assert r["entropy"]["noise"] > results["MAP"]["entropy"]["noise"]
    assert (tmp_path / "laplace_digits.png").stat().st_size > 10_000


def test_the_whole_jacobian_fallback_equals_the_walk(monkeypatch):
    """A unit whose arrays the posterior table does not know (a user's compound layer that transforms its
    parameters) sends the predictive to the whole-Jacobian contraction: both give the same covariance."""
    import importlib

    module = importlib.import_module("mnet.laplace.predictive")
    net, params, x, y = classifier(CE, n=8)
    for structure in ("diag", "kron"):
        la = mnet.laplace(net, CE, params, x, y, structure=structure, prior_precision=0.4)
        walked = la.functional_covariance(x)[1]
        with monkeypatch.context() as patch:
            patch.setattr(module, "posterior_table", lambda *args: {})
            module.batch_functional_covariance.clear_cache()
            whole = la.functional_covariance(x)[1]
        module.batch_functional_covariance.clear_cache()
        np.testing.assert_allclose(whole, walked, rtol=1e-10, atol=1e-14)


def test_an_optimum_at_the_edge_of_the_search_is_reported():
    """Defect 8: the held-out NLL's best precision sat at the grid's end and came back as if found."""
    import warnings

    net, params, x, y = classifier(CE, n=30, seed=3)
    la = mnet.laplace(net, CE, params, x, y, structure="diag")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the evidence's maximum inside the search: no warning
        best = la.optimize_prior_precision().prior_precision
    assert 1e-6 < best < 1e6
    for lower, upper in ((best * 1e3, 1e8), (1e-9, best * 1e-3)):
        edge = lower if lower > best else upper
        with pytest.warns(mnet.SearchEdgeWarning, match=f"rises towards the search's bound {edge:g}; the optimum may"):
            found = la.optimize_prior_precision(lower=lower, upper=upper).prior_precision
        assert found == pytest.approx(edge, rel=1e-6)
    # this untrained network's held-out NLL falls as the precision shrinks: every grid ends at its smallest value
    with pytest.warns(mnet.SearchEdgeWarning, match="least at the grid's smallest value, 10000"):
        assert la.optimize_prior_precision("nll", x_val=x, targets_val=y, grid=[1e4, 1e5, 1e6]).prior_precision == 1e4
