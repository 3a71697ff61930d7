"""DP-SGD's accounting and sampling: the accountant against dp-accounting's own test vectors and the Gaussian
mechanism's closed form, Poisson batches against their distribution, the clipped sum of a Poisson batch against
per-example gradients from autodiff, and the noise tied to the batch it is calibrated for."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mnet
from mnet.errors import SettingError
from mnet.training.sampling import poisson_batch
from tests.helpers import no_autodiff

CE = mnet.losses.softmax_cross_entropy


def gaussian_delta(epsilon: float, sigma: float) -> float:
    """The exact delta(epsilon) of one Gaussian mechanism of sensitivity 1 (Balle and Wang 2018, Theorem 8)."""
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    return phi(-epsilon * sigma + 1 / (2 * sigma)) - math.exp(epsilon) * phi(-epsilon * sigma - 1 / (2 * sigma))


def test_the_accountant_meets_its_reference_values():
    # dp-accounting's test vector: this noise gives exactly (1, 1e-6)-DP for one unsampled step under RDP.
    assert mnet.dp_epsilon(4.530877117, 1.0, 1, 1e-6, accountant="rdp") == pytest.approx(1.0, abs=1e-5)
    # The PLD accountant is tight: its epsilon is where the closed-form delta of the Gaussian mechanism is 1e-6.
    for sigma in (0.8, 2.0, 4.530877117):
        epsilon = mnet.dp_epsilon(sigma, 1.0, 1, 1e-6)
        assert gaussian_delta(epsilon, sigma) == pytest.approx(1e-6, rel=2e-2)
    # DP-SGD on MNIST as Abadi et al. (2016, section 3.1) set it up: lots of 1% of the data, sigma = 4, delta = 1e-5,
    # 10,000 steps, for which their moments accountant gives epsilon = 1.26 (and the strong composition theorem
    # 9.34). Its successors are tighter: RDP's conversion and the PLD accountant's exact composition stay below it.
    published = 1.26
    rdp_10000 = mnet.dp_epsilon(4.0, 0.01, 10000, 1e-5, accountant="rdp")
    assert 0.75 * published < mnet.dp_epsilon(4.0, 0.01, 10000, 1e-5) < rdp_10000 < published
    # The PLD bound is below RDP's at every length, and both grow with the steps taken.
    rates = dict(noise_multiplier=4.0, sample_rate=0.01, delta=1e-5)
    pld = [mnet.dp_epsilon(**rates, steps=steps) for steps in (100, 1000, 10000)]
    rdp = [mnet.dp_epsilon(**rates, steps=steps, accountant="rdp") for steps in (100, 1000, 10000)]
    assert pld == sorted(pld) and rdp == sorted(rdp) and all(p < r for p, r in zip(pld, rdp))
    assert mnet.dp_epsilon(1.0, 0.01, 0, 1e-5) == 0 and mnet.dp_epsilon(0.0, 0.01, 10, 1e-5) == math.inf
    # Truncation to the buffer of fit's Poisson batches costs a little privacy, never none.
    truncated = mnet.dp_epsilon(1.1, 64 / 1400, 200, 1e-5, examples=1400)
    assert mnet.dp_epsilon(1.1, 64 / 1400, 200, 1e-5) <= truncated < 1.1 * mnet.dp_epsilon(1.1, 64 / 1400, 200, 1e-5)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(noise_multiplier=-1.0), "noise_multiplier must be a number >= 0"),
        (dict(sample_rate=0.0), "sample_rate must be in"),
        (dict(sample_rate=1.5), "sample_rate must be in"),
        (dict(steps=-1), "steps must be an int"),
        (dict(steps=2.5), "steps must be an int"),
        (dict(delta=0.0), "delta must be in"),
        (dict(delta=1.0), "delta must be in"),
        (dict(accountant="moments"), "accountant must be one of"),
        (dict(examples=100, accountant="rdp"), 'accounted by accountant="pld" only'),
        (dict(examples=0), "examples must be a positive int"),
    ],
)
def test_the_accountant_refuses_bad_settings(arguments, message):
    settings = {**dict(noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=1e-5), **arguments}
    with pytest.raises(SettingError, match=message):
        mnet.dp_epsilon(**settings)


def test_poisson_batches_follow_their_distribution():
    examples, batch, capacity = 500, 40, mnet.poisson_capacity(500, 40)
    assert capacity == 40 + math.ceil(5 * math.sqrt(40))
    draw = jax.jit(jax.vmap(lambda k: poisson_batch(k, examples, batch, capacity)))
    indices, included = draw(jax.random.split(jax.random.key(0), 2000))
    sizes = np.asarray(included.sum(axis=1))
    # Binomial(500, 0.08): mean 40, variance 36.8; 2000 draws pin the mean to 0.14 and the variance to 1.2.
    assert abs(sizes.mean() - 40) < 0.6 and abs(sizes.var() - 40 * (1 - 40 / 500)) < 5
    rows = np.asarray(indices)[np.asarray(included) > 0]
    assert rows.min() >= 0 and rows.max() < examples
    # every example equally likely: each is drawn about 2000 * 0.08 = 160 times
    counts = np.bincount(rows, minlength=examples)
    assert abs(counts.mean() - 160) < 1 and counts.std() < 3 * math.sqrt(160)
    assert all(len(set(r[m > 0])) == int(m.sum()) for r, m in zip(np.asarray(indices)[:50], np.asarray(included)[:50]))


def test_a_poisson_batch_sums_the_included_clipped_gradients_over_the_expected_batch():
    with jax.enable_x64(True):
        net = mnet.serial(mnet.Dense(5), mnet.Tanh(), mnet.Dense(3))
        _, params = net.init(jax.random.key(0), (4,), jnp.float64)
        x = jax.random.normal(jax.random.key(1), (9, 4), jnp.float64)
        y = jnp.arange(9) % 3
        included = jnp.asarray([1, 0, 1, 1, 0, 1, 1, 0, 0], jnp.float64)
        clipped = mnet.clipped_value_and_grad(net, CE, 0.2)
        value, grads = jax.jit(lambda p: clipped(p, x, y, included=included, expected_batch=6))(params)

        def one(p, xi, yi):
            return CE.value(net.forward(p, xi[None])[0], yi[None])

        per_example = jax.vmap(jax.grad(one), (None, 0, 0))(params, x, y)
        norms = jnp.sqrt(sum(jnp.sum(g.reshape(9, -1) ** 2, axis=1) for g in jax.tree_util.tree_leaves(per_example)))
        weights = jnp.minimum(1, 0.2 / norms) * included / 6
        expected = jax.tree_util.tree_map(lambda g: jnp.tensordot(weights, g, 1), per_example)
        for mine, reference in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected)):
            np.testing.assert_allclose(mine, reference, rtol=1e-12, atol=1e-15)
        losses = jax.vmap(one, (None, 0, 0))(params, x, y)
        assert float(value) == pytest.approx(float(jnp.sum(losses * included) / 5), rel=1e-12)
        with no_autodiff():  # the weighted clipped sum is hand-derived too
            jax.make_jaxpr(lambda p: clipped(p, x, y, included=included, expected_batch=6))(params)


def test_the_noise_is_tied_to_the_batch_it_is_calibrated_for():
    dataset = mnet.data.load_digits(0)
    net = mnet.mlp([32, 10])
    _, params = net.init(jax.random.key(0), (64,))
    clipped = mnet.clipped_value_and_grad(net, CE, 1.0)

    def train(noise, **options):
        private = optax.chain(noise, optax.sgd(0.5))
        return mnet.fit(net, CE, params, dataset, optimizer=private, epochs=3, batch_size=64, grad=clipped, **options)

    with pytest.raises(SettingError, match="calibrated for batches of 32, but the step averages over 64 examples"):
        train(mnet.dp_noise(1.0, 1.0, 32, jax.random.key(1)))
    poisson = train(mnet.dp_noise(1.0, 1.0, None, jax.random.key(1)), sampling="poisson")
    assert poisson.history.test_accuracy[-1] > 0.8
    with pytest.raises(SettingError, match="calibrated for batches of 32, but the step averages over 64"):
        train(mnet.dp_noise(1.0, 1.0, 32, jax.random.key(1)), sampling="poisson")
    with pytest.raises(SettingError, match="takes the batch from the training step"):
        noise = mnet.dp_noise(1.0, 1.0, None, jax.random.key(0))
        noise.update({"W": jnp.zeros(3)}, noise.init(None))
    with pytest.raises(SettingError, match='sampling="poisson"\\) draws batches of varying size'):
        mnet.fit(net, CE, params, dataset, epochs=1, sampling="poisson")


@pytest.mark.parametrize(
    "arguments, message",
    [
        ((-1.0, 1.0, 8), "clip_norm must be a positive number"),
        ((0.0, 1.0, 8), "clip_norm must be a positive number"),
        ((1.0, -0.5, 8), "noise_multiplier must be a number >= 0"),
        ((1.0, 1.0, 0), "batch_size must be a positive int"),
        ((1.0, 1.0, 2.5), "batch_size must be a positive int"),
        ((float("nan"), 1.0, 8), "clip_norm must be a positive number"),
    ],
)
def test_dp_noise_refuses_bad_settings(arguments, message):
    with pytest.raises(SettingError, match=message):
        mnet.dp_noise(*arguments, jax.random.key(0))
