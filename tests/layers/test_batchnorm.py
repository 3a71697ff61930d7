"""BatchNorm: training mode against autodiff, the running statistics exactly as documented, evaluation mode, the
state through fit and checkpoints, and the refusal of per-example quantities in training mode."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, no_autodiff

import mnet
from mnet.checking.reference import autodiff_value_grad_and_state
from mnet.errors import LayerError
from mnet.training.data import load_digits

LOSS = mnet.losses.softmax_cross_entropy


@pytest.mark.parametrize("shape", [(5,), (4, 4, 3)], ids=["dense", "nhwc"])
def test_check_layer_training_and_evaluation(shape):
    """Training mode (backward, tangent, Hessian-vector rule) and evaluation mode (every rule) against autodiff."""
    report = mnet.check_layer(mnet.BatchNorm(), shape)
    assert report.ok, str(report)
    assert {"backward[train]", "per_example_backward"} <= {row.rule for row in report.rows}


def _cnn(x64=True):
    net = mnet.serial(mnet.Conv2D(3, 3), mnet.BatchNorm(momentum=0.2), mnet.Relu(), mnet.Flatten(), mnet.Dense(3))
    _, params = net.init(jax.random.key(0), (4, 4, 2), jnp.float64 if x64 else jnp.float32)
    return net, params


def test_state_updates_exactly_as_documented():
    with jax.enable_x64(True):
        net, params = _cnn()
        state = mnet.init_state(net, params, (4, 4, 2))
        assert state[0] == () and set(state[1]) == {"mean", "var"}
        x = jax.random.normal(jax.random.key(1), (6, 4, 4, 2), jnp.float64)
        targets = jnp.arange(6) % 3
        with no_autodiff():
            value, grads, new_state = jax.jit(mnet.value_grad_and_state(net, LOSS))(params, state, x, targets)
        reference = autodiff_value_grad_and_state(net, LOSS)(params, state, x, targets)
        # The convolution's bias gradient is 0 in exact arithmetic (BatchNorm removes any shift): tree scale.
        assert_trees_close((value, grads, new_state), reference, 1e-10, tree_scale=True)
        z = np.asarray(net.layers[0].apply(params[0], x)).reshape(-1, 3)  # what the BatchNorm normalises
        np.testing.assert_allclose(new_state[1]["mean"], 0.8 * 0 + 0.2 * z.mean(0), rtol=1e-12)
        np.testing.assert_allclose(new_state[1]["var"], 0.8 * 1 + 0.2 * z.var(0, ddof=1), rtol=1e-12)
        # Evaluation mode: the running statistics, an affine map of each example alone.
        y = net.apply(params, x[:2], state=new_state)
        manual = (z[: 2 * 4] - new_state[1]["mean"]) / np.sqrt(new_state[1]["var"] + 1e-5)
        manual = manual * params[1]["gamma"] + params[1]["beta"]
        after = mnet.serial(*net.layers[2:]).apply(params[2:], jnp.asarray(manual).reshape(2, 2, 2, 3))
        np.testing.assert_allclose(y, after, rtol=1e-12)
        np.testing.assert_allclose(net.apply(params, x[:1], state=new_state), y[:1], rtol=1e-12)


def test_per_example_quantities_refuse_training_mode_and_work_in_evaluation():
    with jax.enable_x64(True):
        net, params = _cnn()
        x = jax.random.normal(jax.random.key(1), (4, 4, 4, 2), jnp.float64)
        targets = jnp.array([0, 1, 2, 0])
        refusals = {
            "per_example_grads": lambda **kw: mnet.per_example_grads(net, LOSS)(params, x, targets, **kw),
            "per_example_grad_norms": lambda **kw: mnet.per_example_grad_norms(net, LOSS)(params, x, targets, **kw),
            "ntk": lambda **kw: mnet.ntk(net)(params, x, x, **kw),
            "jacobian": lambda **kw: mnet.jacobian(net)(params, x, **kw),
            "diag_ggn": lambda **kw: mnet.diag_ggn(net, LOSS)(params, x, targets, **kw),
            "kfac_factors": lambda **kw: mnet.kfac_factors(net, LOSS)(params, x, targets, **kw),
        }
        for call in refusals.values():
            with pytest.raises(LayerError, match=r"BatchNorm\(momentum=0.2\) at position \[1\].*depends on the other"):
                call()
        state = jax.tree_util.tree_map(lambda s: s + 0.5, mnet.init_state(net, params, (4, 4, 2)))
        one = lambda p, xb, yb: LOSS.value(net.apply(p, xb[None], state=state), yb[None])  # noqa: E731
        expected = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, targets)
        assert_trees_close(refusals["per_example_grads"](state=state), expected, 1e-10)
        ntk = refusals["ntk"](state=state)
        J = jax.jacrev(lambda p: net.apply(p, x, state=state))(params)
        flat = jnp.concatenate([j.reshape(4, 3, -1) for j in jax.tree_util.tree_leaves(J)], -1)
        np.testing.assert_allclose(ntk, jnp.einsum("akp,ckp->ac", flat, flat), rtol=1e-10)


def test_bad_state_names_the_layer():
    net, params = _cnn(x64=False)
    x = jnp.zeros((2, 4, 4, 2))
    with pytest.raises(LayerError, match=r"BatchNorm.*at position \[1\].*state of shape \(3,\)"):
        net.apply(params, x, state=((), {"mean": jnp.zeros(5), "var": jnp.ones(5)}, (), (), ()))
    with pytest.raises(LayerError, match=r"state tuple of 5 entries"):
        net.apply(params, x, state=((), ()))


def test_fit_resumes_bit_for_bit_and_evaluates_with_running_statistics(tmp_path):
    data = load_digits()
    data = dataclasses.replace(
        data, x_train=data.x_train[:256], y_train=data.y_train[:256], x_test=data.x_test[:128], y_test=data.y_test[:128]
    )
    net = mnet.serial(mnet.Dense(32), mnet.BatchNorm(), mnet.Relu(), mnet.Dense(10))
    _, params = net.init(jax.random.key(0), (64,))
    kwargs = dict(epochs=3, batch_size=32, optimizer=optax.adam(1e-2))
    full = mnet.fit(net, LOSS, params, data, **kwargs)
    path = tmp_path / "run.ckpt"
    mnet.fit(net, LOSS, params, data, **dict(kwargs, epochs=2), checkpoint_path=path)
    resumed = mnet.fit(net, LOSS, params, data, **kwargs, checkpoint_path=path, resume=True)
    leaves = jax.tree_util.tree_leaves
    pairs = zip(leaves((full.params, full.state)), leaves((resumed.params, resumed.state)))
    assert all(bool(jnp.array_equal(a, b)) for a, b in pairs)
    assert float(jnp.max(jnp.abs(full.state[1]["var"] - 1))) > 1e-3  # the statistics moved
    outputs = net.apply(full.params, jnp.asarray(data.x_test), state=full.state)
    accuracy = float(jnp.mean(jnp.argmax(outputs, -1) == jnp.asarray(data.y_test)))
    assert accuracy == pytest.approx(full.history.test_accuracy[-1])
    with pytest.raises(ValueError, match="keeps state"):
        mnet.fit(net, LOSS, params, data, epochs=1, grad=mnet.value_and_grad(net, LOSS))


def test_check_layer_names_a_wrong_state_rule():
    """A stateful layer whose update changes the state's structure (here: the variance lost its shape) is named by
    the ``updated_state`` row; its other rules still agree."""
    from dataclasses import dataclass

    @dataclass(frozen=True, repr=False)
    class ShapeLosingBatchNorm(mnet.BatchNorm):
        def updated_state(self, state, cache):
            moved = super().updated_state(state, cache)
            return {"mean": moved["mean"], "var": moved["var"].sum()}

    report = mnet.check_layer(ShapeLosingBatchNorm(), (3,))
    assert report.wrong == ["updated_state"], str(report)
    assert mnet.check_layer(mnet.BatchNorm(), (3,))["updated_state"].ok
