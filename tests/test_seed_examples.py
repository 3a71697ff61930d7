"""The three worked examples of seed document 000 (batch rows), reproduced exactly, plus db and dx.

Exactness is a property of the code XLA generates: the suite compiles with LLVM's cheapest code generation
(tests/conftest.py), whose dot products skip fused multiply-adds and land one unit in the last place away on
one entry. So in the suite these run in a subprocess compiled as users' programs are."""

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import mnet

CHEAP = "--xla_backend_optimization_level=0"
default_compiler = pytest.mark.skipif(
    CHEAP in os.environ.get("XLA_FLAGS", ""),
    reason="run with the default compiler by test_the_examples_under_the_default_compiler",
)

A_PREV = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
W = jnp.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
B = jnp.array([0.1, 0.2])
DZ = jnp.array([[0.1, 0.2], [0.3, 0.4]])
EXACT = dict(rtol=2e-16, atol=0)  # one rounding of the decimal literals, no more


@default_compiler
def test_example_1_linear_forward():
    z, _ = mnet.Dense(2).forward({"W": W, "b": B}, A_PREV)
    np.testing.assert_allclose(z, [[2.3, 3.0], [5.0, 6.6]], **EXACT)


@default_compiler
def test_example_2_relu_after_linear():
    net = mnet.serial(mnet.Dense(2), mnet.Relu())
    a = net.apply(({"W": W, "b": B}, ()), A_PREV)
    np.testing.assert_allclose(a, [[2.3, 3.0], [5.0, 6.6]], **EXACT)
    # And where ReLU has something to do: the same layer with the bias pushed negative.
    a = net.apply(({"W": W, "b": jnp.array([-2.5, -3.0])}, ()), A_PREV)
    np.testing.assert_allclose(a, [[0.0, 0.0], [2.4, 3.4]], rtol=1e-15, atol=1e-15)


@default_compiler
def test_example_3_weight_gradient_and_the_rest_of_the_backward():
    dense = mnet.Dense(2)
    _, cache = dense.forward({"W": W, "b": B}, A_PREV)
    grads, dx = dense.backward({"W": W, "b": B}, cache, DZ)
    np.testing.assert_allclose(grads["W"], [[1.3, 1.8], [1.7, 2.4], [2.1, 3.0]], **EXACT)
    np.testing.assert_allclose(grads["b"], [0.4, 0.6], **EXACT)
    np.testing.assert_allclose(dx, [[0.05, 0.11, 0.17], [0.11, 0.25, 0.39]], **EXACT)


@pytest.mark.skipif(CHEAP not in os.environ.get("XLA_FLAGS", ""), reason="the examples ran in this process")
def test_the_examples_under_the_default_compiler():
    flags = os.environ.get("XLA_FLAGS", "").replace(CHEAP, "").strip()
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, XLA_FLAGS=flags, MNET_TESTS_DEFAULT_COMPILER="1"),
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "3 passed" in result.stdout, result.stdout[-3000:]
