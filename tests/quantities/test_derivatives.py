"""Per-example gradients and norms, DP-SGD clipping, the output-parameter Jacobian and the NTK, all against
autodiff references on random networks, and the derivation document's formulas entry by entry."""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import mnet
from tests.helpers import (
    assert_trees_close,
    check_all,
    mlp_problems,
    no_autodiff,
    reference_norms,
    reference_ntk,
    reference_per_example_grads,
)


@settings(max_examples=4)
@given(mlp_problems(jnp.float64))
def test_random_networks_float64_jitted(problem):
    check_all(problem, 1e-9, jit=True)


@settings(max_examples=2)  # eager is slow; the jitted twin above covers more architectures
@given(mlp_problems(jnp.float64))
def test_random_networks_float64_eager(problem):
    check_all(problem, 1e-9, jit=False)


@settings(max_examples=3)
@given(mlp_problems(jnp.float32))
def test_random_networks_float32(problem):
    check_all(problem, None, jit=True)


@dataclass(frozen=True, repr=False)
class OpaqueScale(mnet.Layer):
    """A user layer with params but no per-example rule: y = x * s (s per feature)."""

    def init(self, key, input_shape, dtype=None):
        return tuple(input_shape), {"s": jnp.linspace(0.5, 1.5, input_shape[-1], dtype=dtype or jnp.float32)}

    def forward(self, params, x):
        return x * params["s"], x

    def backward(self, params, x, dy):
        return {"s": jnp.sum(x * dy, axis=0)}, dy * params["s"]


def test_layers_without_rules_take_the_generic_path():
    net = mnet.serial(mnet.Dense(5), OpaqueScale(), mnet.Tanh(), mnet.Dense(3))
    _, params = net.init(jax.random.key(0), (4,), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (6, 4))
    check_all((net, mnet.losses.softmax_cross_entropy, params, x, jnp.arange(6) % 3), 1e-9, jit=True)


def test_sequence_inputs_use_the_gram_forms():
    """Dense over (batch, positions, features): per-example sums over positions, the Gram-matrix norm and NTK."""
    net = mnet.serial(mnet.Dense(5), mnet.Gelu(), mnet.Dense(2), mnet.Flatten(), mnet.Dense(3))
    _, params = net.init(jax.random.key(0), (4, 3), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (5, 4, 3))
    check_all((net, mnet.losses.mse, params, x, jax.random.normal(jax.random.key(2), (5, 3))), 1e-9, jit=True)


def test_no_autodiff_in_any_derivative():
    net = mnet.serial(mnet.Dense(6), mnet.Elu(), mnet.Dense(4), mnet.Softmax(), mnet.Dense(3))
    loss = mnet.losses.softmax_cross_entropy
    _, params = net.init(jax.random.key(0), (5,))
    x, y = jax.random.normal(jax.random.key(1), (4, 5)), jnp.array([0, 1, 2, 0])
    expected = {
        "grads": reference_per_example_grads(net, loss, params, x, y),
        "jacobian": jax.jacrev(net.apply)(params, x),
        "ntk": reference_ntk(net, params, x, x),
    }
    with no_autodiff():
        got = {
            "grads": jax.jit(mnet.per_example_grads(net, loss))(params, x, y),
            "norms": mnet.per_example_grad_norms(net, loss)(params, x, y),
            "clipped": mnet.clipped_value_and_grad(net, loss, 0.1)(params, x, y),
            "jacobian": jax.jit(mnet.jacobian(net))(params, x),
            "ntk": mnet.ntk(net)(params, x, x),
        }
    assert_trees_close(got["grads"], expected["grads"], 1e-10)
    assert_trees_close(got["jacobian"], expected["jacobian"], 1e-10)
    assert_trees_close(got["ntk"], expected["ntk"], 1e-10)
    assert_trees_close(got["norms"], reference_norms(expected["grads"], 4), 1e-10)


class TestDerivationDocument:
    """The derivation document writes, in column vectors (y = phi^n(W^n ... phi^0(W^0 x + b^0) ... + b^n)),

        dy/dW^n_ij = O_i phi^n'(z^n) o_j a^{n-1}
        dy/dW^m_ij = phi^n'(z^n) * W^n (... phi^{m+1}'(z^{m+1}) * (W^{m+1} (O_i phi^m'(z^m) o_j a^{m-1})))
        dy/db^m_i  = the same with o_j a^{m-1} replaced by 1

    with O_i keeping only entry i of a vector and o_j picking entry j. Its W^m is mnet's W.T. These tests
    evaluate the formulas literally, entry by entry, with the selector matrices built explicitly."""

    @pytest.fixture
    def network(self):
        net = mnet.serial(mnet.Dense(4), mnet.Tanh(), mnet.Dense(3), mnet.Sigmoid(), mnet.Dense(2), mnet.Tanh())
        _, params = net.init(jax.random.key(3), (3,), jnp.float64)
        params = jax.tree_util.tree_map(lambda p: p + 0.2, params)
        x = np.asarray(jax.random.normal(jax.random.key(4), (2, 3)))
        columns = [(np.asarray(params[i]["W"]).T, np.asarray(params[i]["b"])) for i in (0, 2, 4)]
        derivatives = [
            lambda z: 1 - np.tanh(z) ** 2,
            lambda z: (s := 1 / (1 + np.exp(-z))) * (1 - s),
            lambda z: 1 - np.tanh(z) ** 2,
        ]
        activations = [np.tanh, lambda z: 1 / (1 + np.exp(-z)), np.tanh]
        return net, params, x, columns, activations, derivatives

    @staticmethod
    def forward_columns(columns, activations, x_col):
        a, zs, inputs = x_col, [], []
        for (W, b), phi in zip(columns, activations):
            inputs.append(a)
            zs.append(W @ a + b)
            a = phi(zs[-1])
        return zs, inputs

    @staticmethod
    def selector_O(n, i):
        O = np.zeros((n, n))
        O[i, i] = 1
        return O

    @staticmethod
    def selector_o(n, j):
        o = np.zeros(n)
        o[j] = 1
        return o

    def formula(self, m, i, j, columns, derivatives, zs, inputs):
        """dy/dW^m_ij (or dy/db^m_i when j is None) by the document's nested formula."""
        n_out = columns[m][0].shape[0]
        inner = self.selector_O(n_out, i) @ derivatives[m](zs[m])
        if j is not None:
            inner = inner * (self.selector_o(inputs[m].shape[0], j) @ inputs[m])
        for layer in range(m + 1, len(columns)):
            inner = derivatives[layer](zs[layer]) * (columns[layer][0] @ inner)
        return inner

    @pytest.mark.parametrize("m", [2, 1, 0], ids=["last layer", "inner layer", "first layer"])
    def test_entry_by_entry(self, network, m):
        net, params, x, columns, activations, derivatives = network
        jac = mnet.jacobian(net)(params, jnp.asarray(x))
        J_W, J_b = np.asarray(jac[2 * m]["W"]), np.asarray(jac[2 * m]["b"])
        for example in range(x.shape[0]):
            zs, inputs = self.forward_columns(columns, activations, x[example])
            W = columns[m][0]
            for i in range(W.shape[0]):
                np.testing.assert_allclose(
                    J_b[example, :, i],
                    self.formula(m, i, None, columns, derivatives, zs, inputs),
                    rtol=1e-12,
                    atol=1e-15,
                )
                for j in range(W.shape[1]):
                    # the document's W^m_ij is mnet's W[j, i]
                    np.testing.assert_allclose(
                        J_W[example, :, j, i],
                        self.formula(m, i, j, columns, derivatives, zs, inputs),
                        rtol=1e-12,
                        atol=1e-15,
                    )


def test_dp_noise_statistics_and_dp_training():
    noise = mnet.dp_noise(clip_norm=2.0, noise_multiplier=1.5, batch_size=10, key=jax.random.key(0))
    zeros = {"W": jnp.zeros((300, 200))}
    state = noise.init(zeros)
    first, state = noise.update(zeros, state)
    second, _ = noise.update(zeros, state)
    sigma = 1.5 * 2.0 / 10
    assert abs(float(jnp.std(first["W"])) / sigma - 1) < 0.01
    assert abs(float(jnp.mean(first["W"]))) < 5 * sigma / np.sqrt(first["W"].size)  # five standard errors
    assert not jnp.allclose(first["W"], second["W"])

    dataset = mnet.data.load_digits(0)
    net = mnet.mlp([64, 10])
    _, params = net.init(jax.random.key(0), (64,))
    loss = mnet.losses.softmax_cross_entropy
    private = optax.chain(mnet.dp_noise(1.0, 0.5, 64, jax.random.key(1)), optax.adam(2e-3))
    result = mnet.fit(
        net,
        loss,
        params,
        dataset,
        optimizer=private,
        epochs=8,
        batch_size=64,
        grad=mnet.clipped_value_and_grad(net, loss, 1.0),
    )
    assert result.history.test_accuracy[-1] > 0.85
