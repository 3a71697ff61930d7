"""K-FAC with the eigenvalue correction (EK-FAC) as an optimizer: its direction against the damped dense block
``(Q diag(S) Q^T + damping I)^-1 g`` built from :func:`mnet.ekfac_factors` and solved by numpy in float64, the
corrected eigenvalues averaged within a period and restarted at a refresh, training on digits, no autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mnet
from mnet import train
from mnet.quantities.ekfac import eigen_correction, eigenbases
from tests.helpers import assert_trees_close, no_autodiff

CE = mnet.losses.softmax_cross_entropy
NET = mnet.serial(mnet.Dense(5), mnet.Tanh(), mnet.Dense(3))


def problem(seed):
    rng = np.random.default_rng(seed)
    _, params = NET.init(jax.random.key(0), (4,), jnp.float64)
    return params, jnp.asarray(rng.normal(size=(8, 4))), jnp.asarray(rng.integers(0, 3, 8))


def dense_direction(block, grads, damping):
    Q = np.kron(np.asarray(block["QA"]), np.asarray(block["QG"]))
    matrix = Q @ np.diag(np.asarray(block["S"]).reshape(-1)) @ Q.T + damping * np.eye(len(Q))
    stacked = np.concatenate([np.asarray(grads["W"]), np.asarray(grads["b"])[None]])
    return np.linalg.solve(matrix, stacked.reshape(-1)).reshape(stacked.shape)


def test_first_direction_is_the_damped_ekfac_block_solve():
    params, x, y = problem(0)
    grads = mnet.grad(NET, CE)(params, x, y)
    pre = mnet.kfac_preconditioner(NET, CE, (4,), kind="kflr", damping=0.03, eigenvalue_correction=True)
    direction, state = pre.update(grads, pre.init(params), params, inputs=x, targets=y)
    blocks = mnet.ekfac_factors(NET, CE)(params, x, y)
    for index in (0, 2):
        expected = dense_direction(blocks[index], grads[index], 0.03)
        np.testing.assert_allclose(direction[index]["W"], expected[:-1], rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(direction[index]["b"], expected[-1], rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(state.scales[index], blocks[index]["S"], rtol=1e-10)
    assert direction[1] == () and int(state.step) == 1


def test_corrected_eigenvalues_average_within_a_period_and_restart_at_a_refresh():
    params, x, y = problem(1)
    _, x2, y2 = problem(2)
    pre = mnet.kfac_preconditioner(NET, CE, (4,), kind="kflr", decay=0.7, inverse_every=2, eigenvalue_correction=True)
    grads = mnet.grad(NET, CE)(params, x, y)
    _, first = pre.update(grads, pre.init(params), params, inputs=x, targets=y)
    _, second = pre.update(grads, first, params, inputs=x2, targets=y2)
    assert_trees_close(second.inverses, first.inverses, 0)  # the bases are kept within a period
    S2 = eigen_correction(NET, CE)(params, x2, y2, first.inverses)
    np.testing.assert_allclose(second.scales[0], 0.7 * first.scales[0] + 0.3 * S2[0], rtol=1e-10)
    _, third = pre.update(grads, second, params, inputs=x, targets=y)  # step 2: a refresh
    bases = eigenbases(third.factors)
    np.testing.assert_allclose(third.inverses[2]["G"], bases[2]["G"], atol=1e-12)
    np.testing.assert_allclose(third.scales[2], eigen_correction(NET, CE)(params, x, y, bases)[2], rtol=1e-10)


def test_factors_every_holds_the_corrected_eigenvalues_between_their_computations():
    params, x, y = problem(1)
    _, x2, y2 = problem(2)
    _, x3, y3 = problem(3)
    options = {"kind": "kflr", "decay": 0.7, "inverse_every": 4, "factors_every": 2, "eigenvalue_correction": True}
    pre = mnet.kfac_preconditioner(NET, CE, (4,), **options)
    grads = mnet.grad(NET, CE)(params, x, y)
    _, first = pre.update(grads, pre.init(params), params, inputs=x, targets=y)
    _, second = pre.update(grads, first, params, inputs=x2, targets=y2)
    assert_trees_close((second.factors, second.scales), (first.factors, first.scales), 0)  # step 1 reads nothing
    _, third = pre.update(grads, second, params, inputs=x3, targets=y3)  # step 2: fresh scales in the held bases
    assert_trees_close(third.inverses, first.inverses, 0)
    S3 = eigen_correction(NET, CE)(params, x3, y3, first.inverses)
    np.testing.assert_allclose(third.scales[0], 0.7 * first.scales[0] + 0.3 * S3[0], rtol=1e-10)


def test_ekfac_trains_digits_without_autodiff():
    digits = mnet.data.load_digits()
    dataset = mnet.data.Dataset(digits.x_train[:600], digits.y_train[:600], digits.x_test, digits.y_test, 10, "digits")
    net = mnet.serial(mnet.Dense(32), mnet.Relu(), mnet.Dense(10))
    _, params = net.init(jax.random.key(0), (64,))
    optimizer = mnet.kfac(net, CE, (64,), eigenvalue_correction=True)
    with no_autodiff():
        result = train.fit(net, CE, params, dataset, epochs=3, optimizer=optimizer, batch_size=32, seed=3)
    adam = train.fit(net, CE, params, dataset, epochs=3, optimizer=optax.adam(1e-3), batch_size=32, seed=3)
    assert result.history.test_accuracy[-1] >= 0.9, result.history.test_accuracy
    assert result.history.test_accuracy[0] > adam.history.test_accuracy[0] + 0.1, (result.history, adam.history)
