"""The K-FAC optimizer: its direction against the closed form on one dense layer (numpy solves in float64), the
moving average and the inverse period, training on digits, checkpoints and resume, the command line, no autodiff on
its step, and clear refusals of bad settings."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mnet
from mnet import cli, train
from mnet.training import data
from tests.helpers import assert_trees_close, load_experiment, no_autodiff

CE = mnet.losses.softmax_cross_entropy


def one_layer_problem(seed=0, batch=6):
    rng = np.random.default_rng(seed)
    net = mnet.Dense(3)
    _, params = net.init(jax.random.key(seed), (4,), jnp.float64)
    params = jax.tree_util.tree_map(lambda p: p + 0.3 * jnp.asarray(rng.normal(size=p.shape)), params)
    x = jnp.asarray(rng.normal(size=(batch, 4)))
    y = jnp.asarray(rng.integers(0, 3, batch))
    return net, params, x, y


def closed_form(A, G, grads, damping, pi_correction):
    A, G = np.asarray(A), np.asarray(G)
    pi = np.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G))) if pi_correction else 1.0
    stacked = np.concatenate([np.asarray(grads["W"]), np.asarray(grads["b"])[None]])
    left = np.linalg.solve(A + pi * np.sqrt(damping) * np.eye(len(A)), stacked)
    return np.linalg.solve((G + np.sqrt(damping) / pi * np.eye(len(G))).T, left.T).T


@pytest.mark.parametrize("pi_correction", [True, False])
def test_direction_equals_the_damped_kronecker_closed_form(pi_correction):
    net, params, x, y = one_layer_problem()
    grads = mnet.grad(net, CE)(params, x, y)
    factors = mnet.kfac_factors(net, CE)(params, x, y)
    pre = mnet.kfac_preconditioner(net, CE, (4,), kind="kflr", damping=0.05, pi_correction=pi_correction)
    direction, state = pre.update(grads, pre.init(params), params, inputs=x, targets=y)
    expected = closed_form(factors["A"], factors["G"], grads, 0.05, pi_correction)
    np.testing.assert_allclose(direction["W"], expected[:-1], rtol=1e-10)
    np.testing.assert_allclose(direction["b"], expected[-1], rtol=1e-10)
    assert int(state.step) == 1
    assert_trees_close(state.factors, factors, 1e-12)  # the first step takes the batch's factors as they are


def test_moving_average_and_inverse_period():
    net, params, x, y = one_layer_problem()
    _, _, x2, y2 = one_layer_problem(seed=1)
    pre = mnet.kfac_preconditioner(net, CE, (4,), kind="kflr", decay=0.8, inverse_every=2)
    grads = mnet.grad(net, CE)(params, x, y)
    _, first = pre.update(grads, pre.init(params), params, inputs=x, targets=y)
    direction, second = pre.update(grads, first, params, inputs=x2, targets=y2)
    f1, f2 = mnet.kfac_factors(net, CE)(params, x, y), mnet.kfac_factors(net, CE)(params, x2, y2)
    assert_trees_close(second.factors, jax.tree_util.tree_map(lambda a, b: 0.8 * a + 0.2 * b, f1, f2), 1e-12)
    assert_trees_close(second.inverses, first.inverses, 0)  # step 1 of a period of 2 keeps step 0's inverses
    np.testing.assert_allclose(direction["W"], closed_form(f1["A"], f1["G"], grads, 1e-2, True)[:-1], rtol=1e-9)
    _, third = pre.update(grads, second, params, inputs=x, targets=y)
    assert not np.allclose(third.inverses["A"], second.inverses["A"])  # step 2 refreshes them


def test_factors_every_holds_the_factors_between_updates_and_averages_at_them():
    net, params, x, y = one_layer_problem()
    batches = [one_layer_problem(seed=s)[2:] for s in range(1, 5)]
    preconditioner = mnet.kfac_preconditioner(net, CE, (4,), kind="kflr", decay=0.8, factors_every=2, inverse_every=4)
    pre, state = jax.jit(preconditioner.update), preconditioner.init(params)
    grads = mnet.grad(net, CE)(params, x, y)
    factors_of = mnet.kfac_factors(net, CE)
    states = []
    for inputs, targets in [(x, y), *batches]:
        direction, state = pre(grads, state, params, inputs=inputs, targets=targets)
        states.append((direction, state))
    f0, f2, f4 = factors_of(params, x, y), factors_of(params, *batches[1]), factors_of(params, *batches[3])
    assert_trees_close(states[0][1].factors, f0, 1e-12)
    assert_trees_close(states[1][1].factors, states[0][1].factors, 0)  # step 1 holds them: its batch is not read
    average = jax.tree_util.tree_map(lambda a, b: 0.8 * a + 0.2 * b, f0, f2)
    assert_trees_close(states[2][1].factors, average, 1e-12)  # one decay per computation, not per step
    assert_trees_close(states[3][1].factors, states[2][1].factors, 0)
    assert_trees_close(states[3][1].inverses, states[0][1].inverses, 0)  # inverses refreshed every 4 steps
    assert_trees_close(states[4][1].factors, jax.tree_util.tree_map(lambda a, b: 0.8 * a + 0.2 * b, average, f4), 1e-12)
    # step 4 refreshes the inverses from those factors: its direction is their closed form
    expected = closed_form(states[4][1].factors["A"], states[4][1].factors["G"], grads, 1e-2, True)
    np.testing.assert_allclose(states[4][0]["W"], expected[:-1], rtol=1e-9)


def test_factored_steps_equal_dense_ones_and_need_the_batch_gradient():
    """Three training steps through make_step, K-FAC's direction in factored form (told the gradient is the batch's)
    and in the dense form: the same parameters and state, KL clipping included; the refusals of a factored form that
    could not be exact."""
    rng = np.random.default_rng(4)
    net = mnet.serial(mnet.Dense(12), mnet.Tanh(), mnet.LayerNorm(), mnet.Dense(3))
    _, params = net.init(jax.random.key(0), (10,), jnp.float64)
    batches = [(jnp.asarray(rng.normal(size=(4, 10))), jnp.asarray(rng.integers(0, 3, 4))) for _ in range(3)]
    grads_fn = mnet.value_and_grad(net, CE)
    results = {}
    for factored in (True, False):
        optimizer = mnet.kfac(net, CE, (10,), kind="kflr", inverse_every=2, kl_clip=1e-4, factored=factored)
        step = jax.jit(train.make_step(grads_fn, optimizer, batch_gradient=True))
        p, state = params, optimizer.init(params)
        for x, y in batches:
            p, state, _ = step(p, state, x, y)
        results[factored] = (p, state)
    assert_trees_close(results[True], results[False], 1e-9)
    assert not np.allclose(results[True][0][0]["W"], params[0]["W"])
    x, y = batches[0]
    pre = mnet.kfac_preconditioner(net, CE, (10,), kind="kflr", factored=True)
    with pytest.raises(mnet.SettingError, match=r"update must be told that grads are that gradient"):
        pre.update(grads_fn(params, x, y)[1], pre.init(params), params, inputs=x, targets=y)
    # a dropout draw makes the step's gradient another network's: make_step does not vouch for it
    dropped = mnet.serial(mnet.Dense(12), mnet.Dropout(0.5), mnet.Dense(3))
    _, dropped_params = dropped.init(jax.random.key(0), (10,), jnp.float64)
    optimizer = mnet.kfac(dropped, CE, (10,), kind="kflr", factored=True)
    step = train.make_step(mnet.value_and_grad(dropped, CE), optimizer, batch_gradient=True)
    with pytest.raises(mnet.SettingError, match="batch_gradient=True"):
        step(dropped_params, optimizer.init(dropped_params), x, y, key=jax.random.key(1), train=True)


def small_digits(n=600):
    full = data.load_digits(0)
    return data.Dataset(full.x_train[:n], full.y_train[:n], full.x_test[:300], full.y_test[:300], 10, "digits-small")


def test_fit_vouches_for_the_hand_derived_gradient_only():
    """fit tells K-FAC that the gradient is the batch's for grad="manual"; autodiff's gradient is preconditioned as
    it is, so a K-FAC that insists on the factored form is refused there."""
    dataset = small_digits(64)
    net = mnet.serial(mnet.Dense(16), mnet.Relu(), mnet.Dense(10))
    _, params = net.init(jax.random.key(0), (64,))
    optimizer = mnet.kfac(net, CE, (64,), factored=True)
    trained = train.fit(net, CE, params, dataset, epochs=1, optimizer=optimizer, batch_size=32)
    assert np.isfinite(trained.history.train_loss[0])
    with pytest.raises(mnet.SettingError, match="batch_gradient=True"):
        train.fit(net, CE, params, dataset, epochs=1, optimizer=optimizer, batch_size=32, grad="autodiff")


def test_kfac_trains_digits_and_resumes_exactly(tmp_path):
    dataset = small_digits()
    net = mnet.serial(mnet.Dense(32), mnet.Relu(), mnet.Dense(10))
    _, params = net.init(jax.random.key(0), (64,))
    options = dict(optimizer=mnet.kfac(net, CE, (64,)), batch_size=32, seed=3)
    whole = train.fit(net, CE, params, dataset, epochs=4, **options)
    assert whole.history.test_accuracy[-1] >= 0.9, whole.history.test_accuracy  # README: 0.98 on all of digits
    adam = train.fit(net, CE, params, dataset, epochs=1, optimizer=optax.adam(1e-3), batch_size=32, seed=3)
    assert whole.history.test_accuracy[0] > adam.history.test_accuracy[0] + 0.1  # far ahead after one epoch
    path = tmp_path / "kfac.ckpt.npz"
    train.fit(net, CE, params, dataset, epochs=2, checkpoint_path=path, **options)
    resumed = train.fit(net, CE, params, dataset, epochs=4, checkpoint_path=path, resume=True, **options)
    assert_trees_close(resumed.params, whole.params, 0)
    assert_trees_close(resumed.opt_state, whole.opt_state, 0)
    # the state is a plain pytree: it round-trips through save_params / load_params
    mnet.save_params(tmp_path / "state.npz", whole.opt_state)
    assert_trees_close(mnet.load_params(tmp_path / "state.npz", whole.opt_state), whole.opt_state, 0)


def test_kfac_step_runs_without_autodiff_on_a_cnn():
    net = mnet.serial(
        mnet.Reshape((8, 8, 1)),
        mnet.Conv2D(4, 3),
        mnet.Relu(),
        mnet.MaxPool2D(2),
        mnet.Flatten(),
        mnet.LayerNorm(),
        mnet.Dense(10),
    )
    dataset = small_digits(64)
    _, params = net.init(jax.random.key(0), (64,))
    x, y = jnp.asarray(dataset.x_train, jnp.float32), jnp.asarray(dataset.y_train)
    optimizer = mnet.kfac(net, CE, (64,))
    step = jax.jit(train.make_step(mnet.value_and_grad(net, CE), optimizer))
    state = optimizer.init(params)
    assert state[0].factors[1]["A"].shape == (10, 10) and state[0].factors[5] is None  # LayerNorm: plain gradient
    with no_autodiff():
        new_params, state, value = step(params, state, x, y, jax.random.key(1))
    assert np.isfinite(float(value)) and int(state[0].step) == 1
    assert_trees_close(new_params[5], params[5], 1.0)  # moved, by the plain gradient, with the right structure


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_cli_trains_with_kfac(capsys, name):
    assert cli.main(["train", "--optimizer", name, "--epochs", "2", "--layers", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["test_accuracy"] > 0.95


@pytest.mark.parametrize(
    "options, message",
    [
        ({"damping": 0.0}, "damping must be > 0"),
        ({"damping": -1.0}, "damping must be > 0"),
        ({"decay": 1.0}, "decay must be in"),
        ({"inverse_every": 0}, "inverse_every must be a positive int"),
        ({"factors_every": 0}, "factors_every must be a positive int"),
        ({"factors_every": 3, "inverse_every": 10}, r"inverse_every \(10\) must be a multiple of factors_every \(3\)"),
        ({"kind": "exact"}, "kind must be one of"),
        ({"factored": "yes"}, "factored must be True, False or None"),
        ({"factored": True, "eigenvalue_correction": True}, "factored=True has no form for EK-FAC"),
    ],
)
def test_bad_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        mnet.kfac(mnet.Dense(2), CE, (3,), **options)


def test_a_network_without_kronecker_layers_and_a_missing_batch_are_refused():
    net = mnet.serial(mnet.LayerNorm(), mnet.Tanh())
    _, params = net.init(jax.random.key(0), (3,))
    with pytest.raises(ValueError, match=r"LayerNorm\(\), Tanh\(\)\) has no layer with Kronecker factors"):
        mnet.kfac(net, CE, (3,)).init(params)
    net, params, x, y = one_layer_problem()
    pre = mnet.kfac_preconditioner(net, CE, (4,))
    with pytest.raises(ValueError, match="needs params and the batch"):
        pre.update(params, pre.init(params), params)
    with pytest.raises(ValueError, match="pass key="):
        pre.update(params, pre.init(params), params, inputs=x, targets=y)


def test_kfac_digits_experiment_quick(tmp_path):
    """``experiments/kfac_digits.py --quick``: three optimizers, accuracies and compile-free seconds per epoch, K-FAC
    ahead of Adam after the first epoch (the documented result), and the plot written."""
    module = load_experiment("kfac_digits")
    with jax.enable_x64(False):
        results = module.main(["--quick", "--out", str(tmp_path)])["MLP 64-64-10"]
    assert set(results) == {"K-FAC", "Adam", "SGD + momentum"}
    for curve in results.values():
        assert len(curve["test_accuracy"]) == 2 and all(0 < a <= 1 for a in curve["test_accuracy"])
        assert curve["steps"] == [44, 88] and 0 < curve["seconds"][0] < curve["seconds"][1]
    assert results["K-FAC"]["test_accuracy"][0] > results["Adam"]["test_accuracy"][0] + 0.05
    assert (tmp_path / "kfac_digits.png").stat().st_size > 10_000


def test_kfac_reads_token_ids_for_a_network_that_starts_with_an_embedding():
    """Defect 2: the dummy input was float, and the error blamed the user's data."""
    net = mnet.serial(mnet.Embedding(11, 8), mnet.Dense(6), mnet.Tanh(), mnet.LastStep(), mnet.Dense(3))
    _, params = net.init(jax.random.key(0), (5,))
    ids = jax.random.randint(jax.random.key(1), (16, 5), 0, 11)
    labels = jnp.arange(16) % 3
    optimizer = mnet.kfac(net, CE, (5,))
    state = optimizer.init(params)
    grads = mnet.grad(net, CE)(params, ids, labels)
    direction, _ = jax.jit(optimizer.update)(grads, state, params, inputs=ids, targets=labels, key=jax.random.key(2))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(direction))
    with pytest.raises(mnet.SettingError, match="has no parameters, so there is nothing to precondition"):
        mnet.kfac(mnet.serial(mnet.Relu()), CE, (5,)).init(())
