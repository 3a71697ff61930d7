"""RNN, LSTM and GRU (backprop through time by hand) and LastStep against JAX autodiff and an independent
implementation of PyTorch's formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close, check_all, load_experiment, no_autodiff

import mnet
from mnet.checking import reference
from mnet.errors import LayerError


def torch_formulas(layer, params, x):
    """The recurrences as ``torch.nn.RNN/LSTM/GRU`` document them, one Python step at a time (independent of mnet's
    scan, its fused input projection and its ``pre`` layout)."""
    H = layer.hidden
    W_ih, W_hh, b_ih, b_hh = (params[k] for k in ("W_ih", "W_hh", "b_ih", "b_hh"))
    h = jnp.zeros((x.shape[0], H), x.dtype)
    c = jnp.zeros_like(h)
    outputs = []
    for t in range(x.shape[1]):
        gi, gh = x[:, t] @ W_ih + b_ih, h @ W_hh + b_hh
        if isinstance(layer, mnet.LSTM):
            i, f, g, o = (gi[:, k * H : (k + 1) * H] + gh[:, k * H : (k + 1) * H] for k in range(4))
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
        elif isinstance(layer, mnet.GRU):
            r = jax.nn.sigmoid(gi[:, :H] + gh[:, :H])
            z = jax.nn.sigmoid(gi[:, H : 2 * H] + gh[:, H : 2 * H])
            n = jnp.tanh(gi[:, 2 * H :] + r * gh[:, 2 * H :])
            h = (1 - z) * n + z * h
        else:
            h = jnp.tanh(gi + gh) if layer.activation == "tanh" else jax.nn.relu(gi + gh)
        outputs.append(h)
    return jnp.stack(outputs, axis=1)


LAYERS = [lambda h: mnet.RNN(h), lambda h: mnet.RNN(h, activation="relu"), mnet.LSTM, mnet.GRU]


@pytest.mark.parametrize("make", LAYERS, ids=["rnn", "rnn-relu", "lstm", "gru"])
def test_forward_backward_tangent_against_autodiff(make):
    """Random sizes (T = 1 included), float64: forward against PyTorch's formulas, backward against jax.vjp, the
    tangent against jax.jvp and the Hessian-vector rule against jax.jvp of jax.vjp, all to 1e-10."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        for trial in range(2):
            T = 1 if trial == 0 else int(rng.integers(2, 9))
            batch, features, hidden = (int(v) for v in rng.integers(1, 6, 3))
            layer = make(hidden)
            _, params = layer.init(jax.random.key(trial), (T, features), jnp.float64)
            x = jnp.asarray(rng.normal(size=(batch, T, features)))
            y, cache = layer.forward(params, x)
            np.testing.assert_allclose(y, torch_formulas(layer, params, x), rtol=1e-12, atol=1e-13)
            dy = jnp.asarray(rng.normal(size=y.shape))
            expected = jax.vjp(layer.apply, params, x)[1](dy)
            assert_trees_close(layer.backward(params, cache, dy), expected, 1e-10)
            dparams = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
            dx = jnp.asarray(rng.normal(size=x.shape))
            expected_tangent = jax.jvp(layer.apply, (params, x), (dparams, dx))[1]
            assert_trees_close(layer.tangent(params, cache, dparams, dx), expected_tangent, 1e-10)
            dy_tangent = jnp.asarray(rng.normal(size=y.shape))
            expected_r = reference.layer_backward_tangent(layer, params, x, dy, dparams, dx, dy_tangent)
            hv, down, down_tangent = layer.backward_tangent(params, cache, (dparams, dx), dy, dy_tangent)
            assert_trees_close((hv, down, down_tangent), (expected_r[0], expected[1], expected_r[1]), 1e-10)


# check_layer (every rule, LSTM -> GRU -> LastStep) runs with the other built-in layers in test_user_layers.


def test_every_derivative_through_a_recurrent_classifier():
    """Per-example grads, norms, clipped gradient, Jacobian and NTK of LSTM -> LastStep -> Dense."""
    with jax.enable_x64(True):
        net = mnet.serial(mnet.LSTM(3), mnet.LastStep(), mnet.Dense(2))
        _, params = net.init(jax.random.key(0), (4, 3), jnp.float64)
        x = jax.random.normal(jax.random.key(1), (3, 4, 3), jnp.float64)
        check_all((net, mnet.losses.softmax_cross_entropy, params, x, jnp.array([0, 1, 1])), 1e-9, jit=True)


def test_gradient_runs_without_autodiff():
    net = mnet.serial(mnet.LSTM(4), mnet.GRU(3), mnet.RNN(3), mnet.LastStep(), mnet.Dense(2))
    _, params = net.init(jax.random.key(0), (5, 2))
    x = jax.random.normal(jax.random.key(1), (3, 5, 2))
    targets = jnp.array([0, 1, 1])
    loss = mnet.losses.softmax_cross_entropy
    reference = mnet.autodiff_value_and_grad(net, loss)(params, x, targets)
    with no_autodiff():
        hand = jax.jit(mnet.value_and_grad(net, loss))(params, x, targets)
        norms = jax.jit(mnet.per_example_grad_norms(net, loss))(params, x, targets)
        _, tangent = jax.jit(mnet.jvp(net))(params, x, params, None)
    assert_trees_close(hand, reference, 2e-5)
    assert norms.shape == (3,) and tangent.shape == (3, 2)


def test_hessian_vector_product_through_every_recurrence():
    """H v of RNN -> GRU -> LSTM -> LastStep -> Dense against jax.jvp of jax.grad (float64, 1e-9) at random
    directions, the hand path under the no-autodiff guard."""
    rng = np.random.default_rng(3)
    loss = mnet.losses.softmax_cross_entropy
    with jax.enable_x64(True):
        net = mnet.serial(mnet.RNN(3), mnet.GRU(4), mnet.LSTM(3), mnet.LastStep(), mnet.Dense(3))
        _, params = net.init(jax.random.key(0), (5, 2), jnp.float64)
        x = jnp.asarray(rng.normal(size=(4, 5, 2)))
        targets = jnp.array([0, 2, 1, 1])
        v = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
        expected = jax.jvp(jax.grad(lambda p: loss.value(net.apply(p, x), targets)), (params,), (v,))[1]
        with no_autodiff():
            hand = jax.jit(mnet.hessian_vector_product(net, loss))(params, x, targets, v)
        assert_trees_close(hand, expected, 1e-9)


def test_the_backward_keeps_less_than_autodiff():
    """A property of the compiled programs: the hand-derived training step of an LSTM keeps at most 0.65 of the
    temporary memory that jax.grad through the scan keeps."""
    from mnet.bench.memory import recurrent_problem
    from mnet.bench.problems import step_contenders
    from mnet.compiled import compiled_memory

    for cell in (mnet.LSTM, mnet.GRU):
        net, params, x, y = recurrent_problem(cell, length=40, batch=16, features=16, hidden=64, classes=4)
        memory = {
            name: compiled_memory(step.func.lower(*step.args).compile())["temp_bytes"]
            for name, step in step_contenders(net, params, x, y).items()
        }
        assert memory["hand"] <= 0.65 * memory["jax.grad"], (cell.__name__, memory)


def test_last_step():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    y, cache = mnet.LastStep().forward((), x)
    np.testing.assert_array_equal(y, x[:, -1])
    _, dx = mnet.LastStep().backward((), cache, jnp.ones((2, 4)))
    np.testing.assert_array_equal(dx, jnp.zeros_like(x).at[:, -1].set(1.0))


def test_bad_input_names_the_layer():
    layer = mnet.LSTM(4)
    _, params = layer.init(jax.random.key(0), (5, 3))
    with pytest.raises(LayerError, match=r"LSTM\(4\).*rank >= 3"):
        layer.forward(params, jnp.zeros((2, 3)))
    with pytest.raises(LayerError, match=r"integer input.*Embedding"):
        layer.forward(params, jnp.zeros((2, 5, 3), jnp.int32))
    with pytest.raises(LayerError, match=r"W_ih of shape \(7, 16\)"):
        layer.forward(params, jnp.zeros((2, 5, 7)))
    net = mnet.serial(mnet.Dense(3), mnet.GRU(2))
    _, net_params = net.init(jax.random.key(0), (4, 3))
    with pytest.raises(LayerError, match=r"GRU\(2\) at position \[1\]"):
        net.forward(net_params, jnp.zeros((2, 4, 3, 3)))
    with pytest.raises(ValueError, match="activation"):
        mnet.RNN(3, activation="sigmoid")


def test_sequence_experiment_quick(tmp_path):
    histories = load_experiment("sequence_rnn").main(["--quick", "--out", str(tmp_path)])
    assert set(histories) == {"LSTM", "GRU", "transformer"}
    assert all(len(accuracy) == 2 and 0 <= accuracy[-1] <= 1 for accuracy in histories.values())
    assert (tmp_path / "sequence_rnn.png").exists()
