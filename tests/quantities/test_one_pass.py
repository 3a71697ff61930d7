"""Several quantities from one pass: each equals its own driver's (each tested against autodiff elsewhere) and
autodiff's directly (``jax.grad``, ``vmap(jax.grad)``), on hand-picked and random networks, with a mask, with
Monte-Carlo columns, and for a layer without per-example rules; the compiled call costs less than the separate
calls by at least their extra forward passes; no autodiff; clear refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnet
from mnet.errors import SettingError
from mnet.quantities.one_pass import QUANTITIES
from tests.cases import random_network
from tests.helpers import assert_trees_close, no_autodiff
from tests.quantities.test_second_order import CE, HAND_PICKED, MSE, problem

SEPARATE = {
    "grad": lambda net, loss, mc: mnet.grad(net, loss),
    "per_example_grads": lambda net, loss, mc: mnet.per_example_grads(net, loss),
    "per_example_grad_norms": lambda net, loss, mc: mnet.per_example_grad_norms(net, loss),
    "sum_grad_squared": lambda net, loss, mc: mnet.sum_grad_squared(net, loss),
    "gradient_variance": lambda net, loss, mc: mnet.gradient_variance(net, loss),
    "diag_ggn": lambda net, loss, mc: mnet.diag_ggn(net, loss, mc),
    "per_example_diag_ggn": lambda net, loss, mc: mnet.per_example_diag_ggn(net, loss, mc),
}


def check(net, loss, params, x, targets, names=QUANTITIES, mc_samples=None, **kwargs):
    got = jax.jit(mnet.one_pass(net, loss, names, mc_samples=mc_samples))(params, x, targets, **kwargs)
    assert set(got) == {"value", *names}
    for name in names:
        extra = {"key": kwargs["key"]} if "key" in kwargs and name.endswith("diag_ggn") else {}
        rest = {k: v for k, v in kwargs.items() if k != "key"}
        expected = SEPARATE[name](net, loss, mc_samples)(params, x, targets, **rest, **extra)
        assert_trees_close(got[name], expected, 1e-12, tree_scale=True)
    return got


def test_every_quantity_equals_autodiff_and_its_own_driver():
    net, shape = HAND_PICKED[1]  # a convolution, pools and a dense read-out
    params, x, targets = problem(net, shape, CE, 1, batch=4)
    got = check(net, CE, params, x, targets)
    value, grad = jax.value_and_grad(lambda p: CE.value(net.apply(p, x), targets))(params)
    np.testing.assert_allclose(got["value"], value, rtol=1e-13)
    assert_trees_close(got["grad"], grad, 1e-11, tree_scale=True)
    own = jax.vmap(lambda xb, tb: jax.grad(lambda p: CE.value(net.apply(p, xb[None]), tb[None]))(params))(x, targets)
    assert_trees_close(got["per_example_grads"], own, 1e-11, tree_scale=True)
    squares = jax.tree_util.tree_map(lambda g: jnp.sum(g * g, axis=0), own)
    assert_trees_close(got["sum_grad_squared"], squares, 1e-11, tree_scale=True)


def test_random_networks_monte_carlo_columns_and_a_subset():
    rng = np.random.default_rng(7)
    for seed in range(3):
        net = random_network(rng)
        params, x, targets = problem(net, (3,), MSE, 30 + seed)
        check(net, MSE, params, x, targets, names=("diag_ggn", "grad", "per_example_grad_norms"))
    check(net, MSE, params, x, targets, names=("per_example_diag_ggn", "diag_ggn"), mc_samples=3, key=jax.random.key(1))


def test_a_mask_and_a_layer_without_per_example_rules():
    net = mnet.models.gpt(7, 5, 8, 1, 2)
    _, params = net.init(jax.random.key(0), (5,), jnp.float64)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 7, (3, 5)))
    mask = jnp.asarray([[True] * 5, [True] * 3 + [False] * 2, [True] * 4 + [False]])
    check(net, CE, params, ids, jnp.roll(ids, 1, axis=1), names=("grad", "per_example_grads", "diag_ggn"), mask=mask)

    class Scale:  # a user's layer with a parameter and a backward only: the drivers go one example at a time
        def init(self, key, shape, dtype=jnp.float64):
            return shape, {"s": jnp.ones((), dtype) * 1.5}

        def forward(self, params, x):
            return params["s"] * x, x

        def backward(self, params, cache, dy):
            return {"s": jnp.sum(cache * dy)}, params["s"] * dy

    plain = mnet.serial(mnet.Dense(4), mnet.Tanh(), Scale(), mnet.Dense(3))
    params, x, targets = problem(plain, (3,), CE, 2)
    check(plain, CE, params, x, targets)


def test_one_pass_costs_less_than_the_separate_calls():
    """On the compiled programs: the gradient, the norms and the GGN diagonal together cost at most the sum of the
    three separate calls less the two forward passes they repeat (XLA computes the shared backward chain once)."""
    net = mnet.mlp([64, 64, 10])
    _, params = net.init(jax.random.key(0), (32,))
    x, y = jnp.ones((16, 32)), jnp.arange(16) % 10

    def flops(f, *args):
        cost = jax.jit(f).lower(*args).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    names = ("grad", "per_example_grad_norms", "diag_ggn")
    together = flops(mnet.one_pass(net, CE, names), params, x, y)
    apart = sum(flops(SEPARATE[name](net, CE, None), params, x, y) for name in names)
    forward = flops(net.apply, params, x)
    assert together <= apart - 2 * forward, (together, apart, forward)


def test_one_pass_runs_without_autodiff():
    net, shape = HAND_PICKED[0]
    params, x, targets = problem(net, shape, CE, 3)
    expected = mnet.one_pass(net, CE, QUANTITIES)(params, x, targets)
    with no_autodiff():
        got = mnet.one_pass(net, CE, QUANTITIES)(params, x, targets)
    assert_trees_close(got, expected, 1e-13, tree_scale=True)


def test_one_pass_refuses_bad_names():
    net, shape = HAND_PICKED[0]
    with pytest.raises(SettingError, match="non-empty list of names"):
        mnet.one_pass(net, CE, "grad")
    with pytest.raises(SettingError, match="distinct names"):
        mnet.one_pass(net, CE, ["grad", "hessian"])
    with pytest.raises(SettingError, match="distinct names"):
        mnet.one_pass(net, CE, ["grad", "grad"])
    params, x, targets = problem(net, shape, CE, 3)
    with pytest.raises(SettingError, match="pass key="):
        mnet.one_pass(net, CE, ["diag_ggn"], mc_samples=2)(params, x, targets)
