"""Each example's own Hessian diagonal (BackPACK's ``BatchDiagHessian``) against ``jax.hessian`` of that example's
loss ``l_b``, on hand-picked networks (a convolution with pools, an embedding) and random ones over three losses; its
mean is :func:`mnet.diag_hessian`; no autodiff on the hand path."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import mnet
from tests.cases import random_network
from tests.helpers import assert_trees_close, no_autodiff
from tests.quantities.test_second_order import BCE, CE, HAND_PICKED, MSE, problem


def reference(net, loss, params, x, targets):
    """``diag(d^2 l_b / d params^2)`` for every example, by ``jax.hessian`` of its own loss."""
    flat, unravel = ravel_pytree(params)

    def one(x_b, t_b):
        own = lambda f: loss.per_example(net.apply(unravel(f), x_b[None]), t_b[None])[0]  # noqa: E731
        return unravel(jnp.diag(jax.hessian(own)(flat)))

    return jax.vmap(one)(x, targets)


def check(net, shape, loss, seed, ids=False):
    params, x, targets = problem(net, shape, loss, seed, ids=ids)
    expected = jax.jit(lambda p: reference(net, loss, p, x, targets))(params)
    got = jax.jit(mnet.per_example_diag_hessian(net, loss))(params, x, targets)
    assert_trees_close(got, expected, 1e-9, tree_scale=True)
    mean = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), got)
    assert_trees_close(mean, mnet.diag_hessian(net, loss)(params, x, targets), 1e-12, tree_scale=True)
    return got


def test_per_example_diag_hessian_of_a_convolution_and_an_embedding():
    check(*HAND_PICKED[1], CE, 1)
    check(*HAND_PICKED[3], CE, 3, ids=True)


def test_per_example_diag_hessian_on_random_architectures():
    rng = np.random.default_rng(31)
    for seed in range(3):
        check(random_network(rng), (3,), [CE, MSE, BCE][seed], 20 + seed)


def test_per_example_diag_hessian_runs_without_autodiff():
    net, shape = HAND_PICKED[0]
    params, x, targets = problem(net, shape, MSE, 4)
    expected = reference(net, MSE, params, x, targets)
    with no_autodiff():
        got = mnet.per_example_diag_hessian(net, MSE)(params, x, targets)
    assert_trees_close(got, expected, 1e-9, tree_scale=True)
    assert all(leaf.shape[0] == 3 for leaf in jax.tree_util.tree_leaves(got))
