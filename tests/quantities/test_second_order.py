"""The exact Hessian diagonal and the Kronecker factors, against dense autodiff references: ``jax.hessian`` of the
batch loss over the flattened parameters; the GGN block ``J^T H_b J`` from ``jax.jacrev`` and ``jax.hessian``;
``jax.vjp`` of the network's tail for the carried columns. Hand-picked and seeded random architectures, every
loss, the identities the issue names, sampling, no autodiff on the hand path, and clear refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import mnet
from mnet.errors import LayerError
from tests.cases import GLU, random_network
from tests.helpers import assert_trees_close, load_experiment, no_autodiff, random_targets

CE, MSE, BCE = mnet.losses.softmax_cross_entropy, mnet.losses.mse, mnet.losses.sigmoid_binary_cross_entropy


def reference_diag_hessian(net, loss, params, x, targets):
    flat, unravel = ravel_pytree(params)
    return unravel(jnp.diag(jax.hessian(lambda f: loss.value(net.apply(unravel(f), x), targets))(flat)))


HAND_PICKED = [  # (network, example shape): every layer kind that must have a second-order rule
    (
        mnet.serial(
            mnet.Dense(5),
            mnet.Tanh(),
            mnet.Dense(4),
            mnet.Gelu(),
            mnet.Dropout(0.5),
            mnet.Dense(4),
            mnet.Softplus(),
            mnet.Dense(3),
        ),
        (4,),
    ),
    (
        mnet.serial(
            mnet.Reshape((5, 5, 1)),
            mnet.Conv2D(3, 3, stride=2, padding="SAME"),
            mnet.Elu(),
            mnet.MaxPool2D(2, stride=1),
            mnet.AvgPool2D(2, padding=1),
            mnet.Sigmoid(),
            mnet.Flatten(),
            mnet.Dense(3),
        ),
        (25,),
    ),
    (
        mnet.serial(
            mnet.parallel(mnet.Dense(3), mnet.serial(mnet.Dense(2), mnet.Gelu(approximate=True)), combine="concat"),
            mnet.Tanh(),
            mnet.residual(mnet.serial(mnet.Dense(5), mnet.Sigmoid(), mnet.Dense(5))),
            mnet.parallel(mnet.Dense(3), mnet.serial(mnet.Tanh(), mnet.Dense(3)), combine="sum"),
        ),
        (4,),
    ),
    (mnet.serial(mnet.Embedding(6, 4), mnet.Tanh(), mnet.Flatten(), mnet.Dense(3)), (3,)),
]
CASES = [(0, CE), (0, MSE), (0, BCE), (1, CE), (2, MSE), (3, CE)]


def problem(net, shape, loss, seed, dtype=jnp.float64, batch=3, ids=False):
    rng = np.random.default_rng(seed)
    _, params = net.init(jax.random.key(seed), shape, dtype)
    x = (
        jnp.asarray(rng.integers(0, 6, (batch,) + shape))
        if ids
        else jnp.asarray(rng.normal(size=(batch,) + shape), dtype)
    )
    return params, x, random_targets(rng, loss, (batch, 3), dtype)


def check_diag_hessian(net, shape, loss, seed, ids=False):
    params, x, targets = problem(net, shape, loss, seed, ids=ids)
    expected = jax.jit(lambda p: reference_diag_hessian(net, loss, p, x, targets))(params)
    got = jax.jit(mnet.diag_hessian(net, loss))(params, x, targets)
    assert_trees_close(got, expected, 1e-9, tree_scale=True)


@pytest.mark.parametrize("index, loss", CASES, ids=[f"{index}-{loss.name}" for index, loss in CASES])
def test_diag_hessian_equals_jax_hessian(index, loss):
    net, shape = HAND_PICKED[index]
    check_diag_hessian(net, shape, loss, index, ids=index == 3)


def test_diag_hessian_on_random_architectures():
    rng = np.random.default_rng(2026)
    for seed in range(4):
        check_diag_hessian(random_network(rng), (3,), [CE, MSE, BCE][seed % 3], 10 + seed)


def test_diag_hessian_in_float32():
    net, shape = HAND_PICKED[0]
    params, x, targets = problem(net, shape, CE, 0, jnp.float32, batch=4)
    expected = reference_diag_hessian(
        net, CE, jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params), x.astype(jnp.float64), targets
    )
    got = jax.jit(mnet.diag_hessian(net, CE))(params, x, targets)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(got)} == {jnp.dtype(jnp.float32)}
    assert_trees_close(jax.tree_util.tree_map(lambda g: g.astype(jnp.float64), got), expected, 1e-4, tree_scale=True)


def test_diag_hessian_is_the_ggn_on_piecewise_linear_networks():
    """With ReLU and max-pooling every layer's own second derivative vanishes, so ``H = GGN`` and the two
    diagonals agree; with tanh they do not (the test can fail)."""
    net = mnet.serial(
        mnet.Reshape((4, 4, 1)),
        mnet.Conv2D(2, 2),
        mnet.Relu(),
        mnet.MaxPool2D(2),
        mnet.Flatten(),
        mnet.Dense(5),
        mnet.LeakyRelu(0.1),
        mnet.residual(mnet.serial(mnet.Dense(5), mnet.Relu())),
        mnet.Dense(3),
    )
    params, x, targets = problem(net, (16,), CE, 3, batch=4)
    assert_trees_close(
        mnet.diag_hessian(net, CE)(params, x, targets),
        mnet.diag_ggn(net, CE)(params, x, targets),
        1e-10,
        tree_scale=True,
    )
    smooth = mnet.serial(mnet.Dense(5), mnet.Tanh(), mnet.Dense(3))
    params, x, targets = problem(smooth, (4,), CE, 4)
    hessian, ggn = mnet.diag_hessian(smooth, CE)(params, x, targets), mnet.diag_ggn(smooth, CE)(params, x, targets)
    assert float(jnp.max(jnp.abs(hessian[0]["W"] - ggn[0]["W"]))) > 1e-6


def test_diag_hessian_batch_mean_convention():
    """A batch repeated twice has the same mean Hessian: a factor-of-batch error cannot pass."""
    net, shape = HAND_PICKED[0]
    params, x, targets = problem(net, shape, MSE, 5)
    once = mnet.diag_hessian(net, MSE)(params, x, targets)
    twice = mnet.diag_hessian(net, MSE)(params, jnp.concatenate([x, x]), jnp.concatenate([targets, targets]))
    assert_trees_close(twice, once, 1e-12)


def ggn_block(net, loss, params, x, targets, index):
    """The GGN block of layer ``index``'s ``concatenate([W, b[None]]).reshape(-1)``, from autodiff."""
    entry = params[index]
    stacked = jnp.concatenate([entry["W"], entry["b"][None]])

    def outputs(flat):
        W = flat.reshape(stacked.shape)
        return net.apply(params[:index] + ({"W": W[:-1], "b": W[-1]},) + params[index + 1 :], x)

    J = jax.jacrev(lambda f: outputs(f).reshape(-1))(stacked.reshape(-1))
    out = net.apply(params, x)
    H = jax.hessian(lambda o: loss.value(o.reshape(out.shape), targets))(out.reshape(-1))
    return J.T @ H @ J


def test_kflr_factors_are_the_ggn_block_at_batch_one():
    net = mnet.serial(mnet.Dense(5), mnet.Tanh(), mnet.Dense(4), mnet.LayerNorm(), mnet.Dense(3))
    for loss in (CE, MSE, BCE):
        params, x, targets = problem(net, (6,), loss, 6, batch=1)
        factors = jax.jit(mnet.kfac_factors(net, loss))(params, x, targets)
        assert factors[1] == () and factors[3] is None  # parameterless; parameters but no Kronecker structure
        for index in (0, 2, 4):
            A, G = factors[index]["A"], factors[index]["G"]
            np.testing.assert_allclose(
                jnp.kron(A, G), ggn_block(net, loss, params, x, targets, index), rtol=1e-10, atol=1e-12
            )


def test_kronecker_factors_over_a_batch_and_over_positions():
    """``A`` is the mean of ``a a^T`` over examples and positions (a convolution's windows, cut here by
    ``jax.lax.conv_general_dilated_patches``, with a 1 appended); ``G`` the mean of ``S S^T``, the columns carried
    to the layer's output by ``jax.vjp`` of the network's tail."""
    conv = mnet.Conv2D(2, 3, stride=2, padding="SAME")
    head = mnet.serial(mnet.Tanh(), mnet.Flatten(), mnet.Dense(3))
    net = mnet.serial(conv, head)
    params, x, targets = problem(net, (5, 5, 2), CE, 7, batch=3)
    factors = jax.jit(mnet.kfac_factors(net, CE))(params, x, targets)
    patches = jax.lax.conv_general_dilated_patches(
        x, (3, 3), (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    # conv_general_dilated_patches orders each window's entries channel-major; mnet's W rows are (kh, kw, c_in).
    patches = patches.reshape(patches.shape[:3] + (2, 9)).swapaxes(-1, -2).reshape(-1, 18)
    a = jnp.concatenate([patches, jnp.ones((patches.shape[0], 1))], axis=1)
    np.testing.assert_allclose(factors[0]["A"], a.T @ a / a.shape[0], rtol=1e-12)
    z = conv.apply(params[0], x)
    outputs, tail = jax.vjp(lambda z_: head.apply(params[1], z_), z)
    S = CE.hessian_sqrt(outputs, targets)
    columns = jax.vmap(lambda s: tail(s)[0])(S).reshape(S.shape[0], -1, 2)
    np.testing.assert_allclose(
        factors[0]["G"], jnp.einsum("cri,crj->ij", columns, columns) / columns.shape[1], rtol=1e-10
    )
    attention = mnet.serial(mnet.MultiHeadSelfAttention(2), mnet.Flatten(), mnet.Dense(3))
    params, x, targets = problem(attention, (3, 4), CE, 8)
    factors = mnet.kfac_factors(attention, CE)(params, x, targets)
    rows = jnp.concatenate([x.reshape(-1, 4), jnp.ones((9, 1))], axis=1)
    np.testing.assert_allclose(factors[0]["q"]["A"], rows.T @ rows / 9, rtol=1e-12)
    assert {name: entry["G"].shape for name, entry in factors[0].items()} == {n: (4, 4) for n in "qkvo"}


def test_kfac_factors_average_their_mc_samples_draws():
    """``kind="kfac", mc_samples=N``: ``G`` is the mean over examples of ``sum_c s_c s_c^T`` over the ``N`` draws of
    ``loss.sampled_hessian_sqrt`` (each divided by ``sqrt(N)``), carried to the layer's output by ``jax.vjp`` of
    the network's tail; with many draws it approaches the exact (KFLR) factor, which one draw does not."""
    dense, head = mnet.Dense(5), mnet.serial(mnet.Tanh(), mnet.Dense(3))
    net = mnet.serial(dense, head)
    params, x, targets = problem(net, (4,), CE, 9, batch=6)
    key = jax.random.key(4)
    factors = jax.jit(mnet.kfac_factors(net, CE, kind="kfac", mc_samples=7))(params, x, targets, key=key)
    outputs, tail = jax.vjp(lambda z: head.apply(params[1], z), dense.apply(params[0], x))
    S = CE.sampled_hessian_sqrt(outputs, targets, key, 7)
    columns = jax.vmap(lambda s: tail(s)[0])(S)
    np.testing.assert_allclose(factors[0]["G"], jnp.einsum("cbi,cbj->ij", columns, columns) / 6, rtol=1e-10)
    np.testing.assert_allclose(factors[1][1]["G"], jnp.einsum("cbi,cbj->ij", S, S) / 6, rtol=1e-10)

    def output_factors(factors):
        return factors[0]["G"], factors[1][1]["G"]

    exact = output_factors(mnet.kfac_factors(net, CE)(params, x, targets))

    def error(samples):
        sampled = mnet.kfac_factors(net, CE, kind="kfac", mc_samples=samples)(params, x, targets, key=key)
        return max(float(jnp.linalg.norm(s - e) / jnp.linalg.norm(e)) for s, e in zip(output_factors(sampled), exact))

    assert error(20_000) < 0.03 < 0.3 < error(1)
    with pytest.raises(mnet.errors.SettingError, match="mc_samples must be a positive int"):
        mnet.kfac_factors(net, CE, kind="kfac", mc_samples=0)
    with pytest.raises(mnet.errors.SettingError, match="only kind=.kfac. does .got 'kflr'"):
        mnet.kfac_factors(net, CE, mc_samples=2)


def test_an_embeddings_kronecker_factors_are_a_dense_layers_on_one_hot_ids():
    """The reference is the same network with the lookup written as ``onehot(ids) W`` (a Dense without bias, whose
    factors the test above checks against autodiff); ``A`` comes out diagonal, the ids' frequencies."""
    head = mnet.serial(mnet.Tanh(), mnet.MultiHeadSelfAttention(2), mnet.Flatten(), mnet.Dense(3))
    net = mnet.serial(mnet.Embedding(6, 4), head)
    params, ids, targets = problem(net, (5,), CE, 9, ids=True)
    dense = mnet.serial(mnet.Dense(4, use_bias=False), head)
    factors = mnet.kfac_factors(net, CE)(params, ids, targets)
    expected = mnet.kfac_factors(dense, CE)(params, jax.nn.one_hot(ids, 6, dtype=jnp.float64), targets)
    assert_trees_close(factors, expected, 1e-12)
    np.testing.assert_allclose(factors[0]["A"], np.diag(np.bincount(np.ravel(ids), minlength=6) / ids.size), rtol=1e-15)


def test_a_users_kronecker_rule_that_cannot_take_a_mask_is_named():
    class OldRule(mnet.Dense):
        def kronecker_factors(self, params, x, S):
            return super().kronecker_factors(params, x, S)

    net = mnet.serial(mnet.Embedding(6, 4), mnet.MultiHeadSelfAttention(2), OldRule(3))
    params, ids, _ = problem(net, (5,), CE, 10, ids=True)
    labels = jnp.zeros((3, 5), int)
    mask = jnp.arange(5)[None] < jnp.array([[5], [3], [1]])
    assert mnet.kfac_factors(net, CE)(params, ids, labels)[2]["A"].shape == (5, 5)  # without a mask it serves
    with pytest.raises(LayerError, match=r"Dense\(3\) at position \[2\].*without kept="):
        mnet.kfac_factors(net, CE)(params, ids, labels, mask=mask)


def test_kfac_sampling_is_unbiased_for_kflr():
    net = mnet.serial(mnet.Dense(4), mnet.Tanh(), mnet.Dense(3))
    for loss in (CE, BCE):
        params, x, targets = problem(net, (3,), loss, 9, batch=2)
        exact = mnet.kfac_factors(net, loss)(params, x, targets)
        replicates = 2000
        draws = jax.jit(jax.vmap(lambda key: mnet.kfac_factors(net, loss, kind="kfac")(params, x, targets, key=key)))(  # noqa: B023 (called at once, in this iteration)
            jax.random.split(jax.random.key(3), replicates)
        )
        for index in (0, 2):
            G, truth = draws[index]["G"], exact[index]["G"]
            assert bool(jnp.all(jnp.abs(G.mean(0) - truth) <= 6 * G.std(0) / np.sqrt(replicates) + 1e-12))
            np.testing.assert_allclose(draws[index]["A"][0], exact[index]["A"], rtol=1e-12)


def test_no_autodiff_in_the_second_order_path():
    net, shape = HAND_PICKED[2]
    params, x, targets = problem(net, shape, CE, 2)
    expected = jax.jit(lambda p: reference_diag_hessian(net, CE, p, x, targets))(params)
    kflr_expected = jax.jit(mnet.kfac_factors(net, CE))(params, x, targets)
    with no_autodiff():
        got = jax.jit(mnet.diag_hessian(net, CE))(params, x, targets)
        kflr = jax.jit(mnet.kfac_factors(net, CE))(params, x, targets)
        kfac = mnet.kfac_factors(net, CE, kind="kfac")(params, x, targets, key=jax.random.key(0))
    assert_trees_close(got, expected, 1e-9, tree_scale=True)
    assert_trees_close(kflr, kflr_expected, 1e-12)
    assert jax.tree_util.tree_structure(kfac) == jax.tree_util.tree_structure(kflr)


def test_bad_input_is_refused_clearly():
    net = mnet.serial(mnet.Dense(4), mnet.residual(mnet.serial(GLU, mnet.Dense(4))), mnet.Dense(3))
    params, x, targets = problem(net, (3,), CE, 0)
    with pytest.raises(
        LayerError,
        match=r"GatedLinearUnit\(width=6\) at position \[1\]\[0\] of the network: has no "
        r"second-order rule",
    ):
        mnet.diag_hessian(net, CE)(params, x, targets)
    with pytest.raises(ValueError, match='kind="kfac"\\) samples from the predictive distribution: pass key='):
        mnet.kfac_factors(net, CE, kind="kfac")(params, x, targets)
    with pytest.raises(ValueError, match="kind must be one of"):
        mnet.kfac_factors(net, CE, kind="eigen")


def test_pruning_experiment_quick(tmp_path):
    """``experiments/pruning.py --quick``: the three criteria agree at 0% sparsity, every accuracy is a fraction,
    Optimal Brain Damage keeps more accuracy than magnitude at 90% without retraining, and the plot is written."""
    module = load_experiment("pruning")
    with jax.enable_x64(False):
        results = module.main(["--quick", "--out", str(tmp_path)])
    pruned = results["pruned"]
    assert len({accuracies[0] for accuracies in pruned.values()}) == 1 and pruned["magnitude"][0] > 0.9
    assert all(0 <= a <= 1 for kind in results.values() for accuracies in kind.values() for a in accuracies)
    assert pruned["OBD, diag Hessian"][-1] > pruned["magnitude"][-1]
    assert (tmp_path / "pruning.png").stat().st_size > 10_000
