"""The hand-derived path never calls JAX autodiff: with the differentiation machinery made unusable, it still
runs and still agrees with the reference computed outside the guard."""

import jax
import jax.numpy as jnp
import pytest

import mnet
from tests.helpers import ACTIVATIONS, AutodiffUsed, assert_trees_close, no_autodiff

NET = mnet.serial(
    mnet.Flatten(),
    *[layer for activation in ACTIVATIONS for layer in (mnet.Dense(6), activation)],
    mnet.Dense(4),
)


def problem(loss):
    _, params = NET.init(jax.random.key(0), (2, 3))
    x = jax.random.normal(jax.random.key(1), (5, 2, 3))
    targets = {
        mnet.losses.softmax_cross_entropy: jnp.array([0, 1, 2, 3, 0]),
        mnet.losses.mse: jnp.ones((5, 4)),
        mnet.losses.sigmoid_binary_cross_entropy: jnp.full((5, 4), 0.25),
    }[loss]
    return params, x, targets


def test_the_guard_really_stops_autodiff():
    with no_autodiff():
        for attempt in (
            lambda: jax.grad(jnp.sin)(1.0),
            lambda: jax.vjp(jnp.sin, 1.0),
            lambda: jax.jvp(jnp.sin, (1.0,), (1.0,)),
            lambda: jax.linearize(jnp.sin, 1.0),
            lambda: jax.jacrev(jnp.tanh)(jnp.ones(2)),
            lambda: jax.jacfwd(jnp.tanh)(jnp.ones(2)),
            lambda: jax.hessian(jnp.sin)(1.0),
            lambda: jax.jit(jax.grad(jnp.cos))(1.0),
        ):
            with pytest.raises(AutodiffUsed):
                attempt()


# Every loss once and both modes once: eager and jitted run the same hand code (jit only traces it), so the full
# product of the two adds about 15 s of compilation on 2 cores and no coverage.
@pytest.mark.parametrize(
    "loss, jit",
    [
        (mnet.losses.mse, False),
        (mnet.losses.softmax_cross_entropy, True),
        (mnet.losses.sigmoid_binary_cross_entropy, True),
    ],
)
def test_value_and_grad_runs_without_autodiff(loss, jit):
    params, x, targets = problem(loss)
    expected = mnet.autodiff_value_and_grad(NET, loss)(params, x, targets)
    hand = mnet.value_and_grad(NET, loss)
    with no_autodiff():
        value, grads = (jax.jit(hand) if jit else hand)(params, x, targets)
        grads_only = mnet.grad(NET, loss)(params, x, targets)
    assert_trees_close((value, grads), expected, 1e-10)
    assert_trees_close(grads_only, expected[1], 1e-10)


def test_the_guard_stops_autodiff_while_tracing():
    """Tracing under the guard is enough to catch autodiff (JAX differentiates while it traces), which lets a test
    check a large function without compiling it twice."""
    with no_autodiff():
        with pytest.raises(AutodiffUsed):
            jax.make_jaxpr(jax.grad(lambda x: jnp.sin(x) ** 2))(1.0)
        assert jax.make_jaxpr(lambda x: jnp.sin(x) ** 2)(1.0).eqns
