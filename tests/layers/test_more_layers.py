"""LayerNorm, Dropout, residual and parallel blocks: forwards against independent implementations, backwards
against jax.vjp / jax.value_and_grad (dropout in training mode included), derivatives, and bad configurations.
(Every one of them is also in tests/test_layers.py's backward-vs-vjp sweep over random shapes.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnet
from mnet.errors import LayerError
from tests.helpers import assert_trees_close, check_all, check_value_and_grad

LOSS = mnet.losses.softmax_cross_entropy


def test_layer_norm_forward_against_its_definition():
    x = jax.random.normal(jax.random.key(0), (4, 3, 7)) * 3 + 1
    params = {"gamma": jnp.linspace(0.5, 2, 7), "beta": jnp.linspace(-1, 1, 7)}
    y = mnet.LayerNorm().apply(params, x)
    xn = np.asarray(x)
    expected = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, expected * np.asarray(params["gamma"]) + np.asarray(params["beta"]), rtol=1e-12)


def test_dropout_rate_is_the_probability_of_dropping():
    x = jnp.ones((200, 500))
    y, mask = mnet.Dropout(0.1).forward((), x, key=jax.random.key(0), train=True)
    dropped = float(jnp.mean(y == 0))
    assert abs(dropped - 0.1) < 0.005  # 10% dropped, not 90%
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1 / 0.9], rtol=1e-6)  # survivors scaled 1/(1-rate)
    assert abs(float(jnp.mean(y)) - 1) < 0.01  # inverted scaling keeps the expectation
    dy = jax.random.normal(jax.random.key(1), x.shape)
    _, dx = mnet.Dropout(0.1).backward((), mask, dy)
    _, vjp = jax.vjp(lambda x: mnet.Dropout(0.1).forward((), x, key=jax.random.key(0), train=True)[0], x)
    assert_trees_close(dx, vjp(dy)[0], 0)


def test_dropout_is_the_identity_when_not_training_and_needs_a_key_when_training():
    x = jax.random.normal(jax.random.key(0), (3, 4))
    assert_trees_close(mnet.Dropout(0.5).apply((), x), x, 0)
    assert_trees_close(mnet.Dropout(0.5).apply((), x, key=jax.random.key(1), train=False), x, 0)
    with pytest.raises(LayerError, match=r"Dropout\(0.5\) at position \[1\].*needs an explicit key"):
        mnet.serial(mnet.Dense(4), mnet.Dropout(0.5)).forward(
            mnet.serial(mnet.Dense(4), mnet.Dropout(0.5)).init(jax.random.key(0), (4,))[1], x, train=True
        )
    with pytest.raises(ValueError, match="probability of dropping"):
        mnet.Dropout(1.0)


MIXED = mnet.serial(
    mnet.Dense(8),
    mnet.LayerNorm(),
    mnet.residual(mnet.serial(mnet.Dense(8), mnet.Gelu(), mnet.Dropout(0.2), mnet.Dense(8))),
    mnet.parallel(mnet.Dense(3), mnet.serial(mnet.Dense(4), mnet.Tanh())),
    mnet.Relu(),
    mnet.Dropout(0.1),
    mnet.parallel(mnet.Dense(5), mnet.serial(mnet.LayerNorm(), mnet.Dense(5)), combine="sum"),
)


def mixed_problem(dtype=jnp.float64):
    _, params = MIXED.init(jax.random.key(0), (6,), dtype)
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)
    return params, jax.random.normal(jax.random.key(1), (7, 6), dtype), jnp.arange(7) % 5


@pytest.mark.parametrize("train", [False, True])
def test_mixed_network_value_and_grad(train):
    params, x, y = mixed_problem()
    check_value_and_grad(MIXED, LOSS, params, x, y, 1e-12, key=jax.random.key(3), train=train)


def test_mixed_network_float32():
    params, x, y = mixed_problem(jnp.float32)
    kwargs = {"key": jax.random.key(3), "train": True}
    assert_trees_close(
        jax.jit(mnet.value_and_grad(MIXED, LOSS), static_argnames="train")(params, x, y, **kwargs),
        jax.jit(mnet.autodiff_value_and_grad(MIXED, LOSS), static_argnames="train")(params, x, y, **kwargs),
    )


def test_mixed_network_derivatives():
    params, x, y = mixed_problem()
    check_all((MIXED, LOSS, params, x, y), 1e-9, jit=True)


def test_mixed_network_reports_agreement_and_trains_with_dropout():
    params, x, y = mixed_problem()
    assert mnet.compare_gradients(MIXED, LOSS, params, x, y, finite_differences=True).ok
    dataset = mnet.data.load_digits(0)
    net = mnet.serial(
        mnet.Dense(64),
        mnet.LayerNorm(),
        mnet.residual(mnet.serial(mnet.Dense(64), mnet.Relu())),
        mnet.Dropout(0.2),
        mnet.Dense(10),
    )
    _, params = net.init(jax.random.key(0), (64,), jnp.float32)
    history = mnet.fit(net, LOSS, params, dataset, epochs=10).history
    assert history.test_accuracy[-1] > 0.95


def test_bad_configurations_name_the_layer_and_shapes():
    with pytest.raises(LayerError, match=r"residual\(Dense\(5\)\) at position \[1\].*shape \(4,\) to \(5,\)"):
        mnet.serial(mnet.Dense(4), mnet.residual(mnet.Dense(5))).init(jax.random.key(0), (3,))
    with pytest.raises(LayerError, match=r"combine='sum' needs equal block output shapes, got \[\(3,\), \(4,\)\]"):
        mnet.parallel(mnet.Dense(3), mnet.Dense(4), combine="sum").init(jax.random.key(0), (2,))
    with pytest.raises(LayerError, match=r"Dense\(2\) at position \[0\]\[1\]"):
        mnet.serial(mnet.parallel(mnet.Dense(3), mnet.Dense(2))).apply(
            ((({"W": jnp.ones((4, 3)), "b": jnp.ones(3)}, {"W": jnp.ones((5, 2)), "b": jnp.ones(2)}),)),
            jnp.ones((2, 4)),
        )
    with pytest.raises(ValueError, match="combine must be 'sum' or 'concat'"):
        mnet.parallel(mnet.Dense(3), combine="max")


def test_fit_trains_dropout_in_training_mode():
    """fit must hand a stochastic network a key and train=True: a huge dropout rate visibly raises the training loss
    the optimiser sees, while the same network without dropout fits the data; same seed, same everything else."""
    dataset = mnet.data.load_digits(0)
    losses = {}
    for rate in (0.0, 0.9):
        net = mnet.serial(mnet.Dense(64), mnet.Relu(), mnet.Dropout(rate), mnet.Dense(10))
        _, params = net.init(jax.random.key(0), (64,), jnp.float32)
        losses[rate] = mnet.fit(net, LOSS, params, dataset, epochs=5).history.train_loss[-1]
    assert losses[0.9] > 2 * losses[0.0]
