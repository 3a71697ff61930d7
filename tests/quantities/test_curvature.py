"""The GGN diagonal, summed and per example, exact and Monte-Carlo, against a dense autodiff reference: ``J_b``
from ``jax.jacrev``, ``H_b`` from ``jax.hessian`` of the per-example loss, on networks of every layer kind and
every loss; the batch-mean convention; unbiased sampling; no autodiff on the hand-derived path."""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import mnet
from mnet.core.curvature import Columns, Curvature, WeightedRows
from mnet.errors import LossError
from tests.cases import GatedLinearUnit
from tests.helpers import assert_trees_close, no_autodiff, random_targets

CE, MSE, BCE = mnet.losses.softmax_cross_entropy, mnet.losses.mse, mnet.losses.sigmoid_binary_cross_entropy


def reference_per_example_diag_ggn(net, loss, params, x, targets):
    """``diag(J_b^T H_b J_b)`` for every example, from the dense Jacobian and the dense output Hessian."""
    flat, unravel = ravel_pytree(params)

    def one(x_b, t_b):
        outputs = net.forward(params, x_b[None])[0][0]
        J = jax.jacrev(lambda f: net.forward(unravel(f), x_b[None])[0][0].reshape(-1))(flat)
        H = jax.hessian(lambda o: loss.per_example(o.reshape((1,) + outputs.shape), t_b[None])[0])(outputs.reshape(-1))
        return unravel(jnp.einsum("kp,kl,lp->p", J, H, J))

    return jax.vmap(one)(x, targets)


NETWORKS = [  # (network, example shape, integer ids?)
    (
        mnet.serial(mnet.Dense(5), mnet.Tanh(), mnet.Dense(4), mnet.Gelu(), mnet.Dropout(0.5), mnet.Dense(3)),
        (4,),
        False,
    ),
    (
        mnet.serial(
            mnet.Dense(5),
            mnet.Softmax(),
            mnet.LayerNorm(),
            mnet.Dense(5),
            mnet.Sigmoid(),
            mnet.Flatten(),
            mnet.Dense(3),
        ),
        (2, 4),
        False,
    ),
    (
        mnet.serial(
            mnet.Reshape((5, 5, 1)),
            mnet.Conv2D(3, 3, stride=2, padding="SAME"),
            mnet.Elu(),
            mnet.MaxPool2D(2, stride=1),
            mnet.AvgPool2D(2, padding=1),
            mnet.Flatten(),
            mnet.Dense(3),
        ),
        (25,),
        False,
    ),
    (
        mnet.serial(
            mnet.Embedding(6, 4),
            mnet.residual(mnet.MultiHeadSelfAttention(2)),
            mnet.LayerNorm(),
            mnet.Flatten(),
            mnet.Dense(3),
        ),
        (3,),
        True,
    ),
    (
        mnet.serial(
            mnet.parallel(mnet.Dense(3), GatedLinearUnit(2), combine="concat"),
            mnet.Tanh(),
            mnet.residual(mnet.serial(mnet.Dense(5), mnet.Relu(), mnet.Dense(5))),
            mnet.Dense(3),
        ),
        (4,),
        False,
    ),
]


def problem(index, loss, dtype=jnp.float64, batch=3):
    net, shape, ids = NETWORKS[index]
    rng = np.random.default_rng(index)
    _, params = net.init(jax.random.key(index), shape, dtype)
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    x = (
        jnp.asarray(rng.integers(0, 6, (batch,) + shape))
        if ids
        else jnp.asarray(rng.normal(size=(batch,) + shape), dtype)
    )
    targets = random_targets(rng, loss, (batch, 3), dtype)
    return net, params, x, targets


# Every loss on the MLP; one loss each on the other networks, in turn (compilations are most of the cost).
CASES = [(0, CE), (0, MSE), (0, BCE), (1, MSE), (2, CE), (3, BCE), (4, CE)]


@pytest.mark.parametrize("index, loss", CASES, ids=[f"{index}-{loss.name}" for index, loss in CASES])
def test_exact_diagonals_equal_the_dense_reference(index, loss):
    net, params, x, targets = problem(index, loss)
    expected = jax.jit(lambda p, inputs, t: reference_per_example_diag_ggn(net, loss, p, inputs, t))(params, x, targets)
    per_example = jax.jit(mnet.per_example_diag_ggn(net, loss))(params, x, targets)
    assert_trees_close(per_example, expected, 1e-9, tree_scale=True)
    mean = jax.jit(mnet.diag_ggn(net, loss))(params, x, targets)
    assert_trees_close(mean, jax.tree_util.tree_map(lambda d: d.mean(0), expected), 1e-9, tree_scale=True)


def test_float32_with_dtype_aware_tolerance():
    net, params, x, targets = problem(2, CE, jnp.float32, batch=4)
    expected = jax.jit(lambda p, inputs, t: reference_per_example_diag_ggn(net, CE, p, inputs, t))(
        jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params), x.astype(jnp.float64), targets
    )
    got = jax.jit(mnet.diag_ggn(net, CE))(params, x, targets)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(got)} == {jnp.dtype(jnp.float32)}
    assert_trees_close(
        jax.tree_util.tree_map(lambda g: g.astype(jnp.float64), got),
        jax.tree_util.tree_map(lambda d: d.mean(0), expected),
        1e-4,
    )


def test_batch_mean_convention_in_closed_form():
    """One dense layer and mse over U outputs: ``H_b = (2 / U) I``, so ``diag(GGN)`` is ``(2 / U) mean_b x_bi^2``
    for ``W[i, j]`` and ``2 / U`` for ``b[j]``: a factor-of-batch or factor-of-2 error cannot pass."""
    net = mnet.serial(mnet.Dense(4))
    _, params = net.init(jax.random.key(0), (3,))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    targets = jnp.zeros((5, 4))
    got = mnet.diag_ggn(net, MSE)(params, x, targets)[0]
    np.testing.assert_allclose(got["W"], jnp.broadcast_to((2 / 4) * jnp.mean(x**2, 0)[:, None], (3, 4)), rtol=1e-12)
    np.testing.assert_allclose(got["b"], jnp.full(4, 2 / 4), rtol=1e-12)
    twice = mnet.diag_ggn(net, MSE)(params, jnp.concatenate([x, x]), jnp.zeros((10, 4)))[0]
    assert_trees_close(twice, got, 1e-12)


@pytest.mark.parametrize("loss", [CE, MSE, BCE], ids=lambda loss: loss.name)
def test_monte_carlo_is_unbiased(loss):
    """The average of R independent estimates (3 samples each) lies within 6 standard errors of the exact
    diagonal, entry by entry, the standard error taken from the estimates' own spread."""
    net, params, x, targets = problem(0, loss)
    exact = mnet.diag_ggn(net, loss)(params, x, targets)
    estimate = jax.jit(jax.vmap(lambda key: mnet.diag_ggn(net, loss, mc_samples=3)(params, x, targets, key=key)))
    replicates = 400
    draws = estimate(jax.random.split(jax.random.key(7), replicates))
    for mean, spread, truth in zip(
        jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda d: d.mean(0), draws)),
        jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda d: d.std(0), draws)),
        jax.tree_util.tree_leaves(exact),
    ):
        assert bool(jnp.all(jnp.abs(mean - truth) <= 6 * spread / np.sqrt(replicates) + 1e-12))
    per_example = mnet.per_example_diag_ggn(net, loss, mc_samples=2)(params, x, targets, key=jax.random.key(1))
    assert jax.tree_util.tree_leaves(per_example)[0].shape[0] == x.shape[0]


def test_no_autodiff_in_the_curvature_path():
    net, params, x, targets = problem(4, CE)
    expected = jax.jit(lambda p, inputs, t: reference_per_example_diag_ggn(net, CE, p, inputs, t))(params, x, targets)
    with no_autodiff():
        got = {
            "per_example": jax.jit(mnet.per_example_diag_ggn(net, CE))(params, x, targets),
            "mean": jax.jit(mnet.diag_ggn(net, CE))(params, x, targets),
            "sampled": mnet.diag_ggn(net, CE, mc_samples=2)(params, x, targets, key=jax.random.key(0)),
        }
    assert_trees_close(got["per_example"], expected, 1e-10)
    assert_trees_close(got["mean"], jax.tree_util.tree_map(lambda d: d.mean(0), expected), 1e-10)
    assert jax.tree_util.tree_structure(got["sampled"]) == jax.tree_util.tree_structure(params)


@dataclass(frozen=True, repr=False)
class Hinge(mnet.losses.Loss):
    """A user's loss with a gradient but no Hessian square root."""

    name = "hinge"

    def per_example(self, outputs, targets):
        return jnp.mean(jnp.maximum(0, 1 - outputs * targets), axis=1)

    def per_example_grad(self, outputs, targets):
        return jnp.where(outputs * targets < 1, -targets, 0) / outputs.shape[1]


def test_bad_input_is_refused_clearly():
    net, params, x, targets = problem(0, MSE)
    with pytest.raises(LossError, match="hinge: this loss has no Hessian square root"):
        mnet.diag_ggn(net, Hinge())(params, x, targets)
    with pytest.raises(ValueError, match=r"mc_samples=2\) draws samples: pass key="):
        mnet.diag_ggn(net, MSE, mc_samples=2)(params, x, targets)
    with pytest.raises(ValueError, match="mc_samples must be a positive int"):
        mnet.diag_ggn(net, MSE, mc_samples=0)


def test_a_carried_curvature_times_a_vector_is_its_dense_hessian_times_it():
    # Columns with and without signs, a factored dense layer's rows and a diagonal: H_b = sum_k s c c^T + diag(d).
    rng = np.random.default_rng(0)
    batch, shape = 3, (2, 4)
    n = int(np.prod(shape))
    plain = rng.normal(size=(2, batch) + shape)
    signed, signs = rng.normal(size=(3, batch) + shape), rng.choice([-1.0, 1.0], size=(3, batch))
    W, d, scale = rng.normal(size=(n, 5)), rng.normal(size=(batch, 5)), rng.normal(size=(batch, n))
    diag, v = rng.normal(size=(batch,) + shape), rng.normal(size=(batch,) + shape)
    rows = WeightedRows(2, jnp.asarray(W), jnp.asarray(d), jnp.asarray(scale))
    flat_rows = Curvature(jnp.zeros((batch, n)), (rows,)).times(jnp.asarray(v.reshape(batch, n)))
    curvature = Curvature(
        jnp.zeros((batch,) + shape),
        (Columns(0, jnp.asarray(plain)), Columns(1, jnp.asarray(signed), jnp.asarray(signs))),
        jnp.asarray(diag),
    )
    for b in range(batch):
        c1, c2 = plain[:, b].reshape(2, n), signed[:, b].reshape(3, n)
        H = c1.T @ c1 + (c2.T * signs[:, b]) @ c2 + np.diag(diag[b].reshape(n))
        np.testing.assert_allclose(np.asarray(curvature.times(jnp.asarray(v)))[b].reshape(n), H @ v[b].reshape(n),
                                   rtol=1e-12, atol=1e-12)  # fmt: skip
        H_rows = np.diag(scale[b]) @ W @ np.diag(d[b]) @ W.T @ np.diag(scale[b])
        np.testing.assert_allclose(np.asarray(flat_rows)[b], H_rows @ v[b].reshape(n), rtol=1e-12, atol=1e-12)
