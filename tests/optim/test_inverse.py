"""K-FAC's refresh inverse (products and Gauss-Jordan sweeps, no LAPACK) against numpy's LAPACK inverse in float64
and, in float32, against the Cholesky inverse it replaces, on sizes at, below and above the leaf (odd splits included), without
autodiff; and in the compiled program, no LAPACK call."""

import jax
import jax.numpy as jnp
import numpy as np

from mnet.compiled import SOLVER
from mnet.optim.inverse import spd_inverse
from tests.helpers import no_autodiff


def random_spd(rng, n, condition):
    """A random symmetric positive definite ``n x n`` matrix with eigenvalues spread over ``condition``."""
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (Q * np.geomspace(1.0, 1.0 / condition, n)) @ Q.T


def test_the_inverse_equals_lapacks_in_float64_and_float32():
    rng = np.random.default_rng(0)
    with no_autodiff():
        for n, leaf, condition in (
            (1, 64, 1.0),
            (5, 64, 1e3),
            (64, 64, 1e4),
            (65, 64, 1e4),
            (200, 16, 1e5),
            (37, 4, 1e3),
        ):
            M = random_spd(rng, n, condition)
            expected = np.linalg.inv(M)
            inverse = jax.jit(spd_inverse, static_argnums=1)(jnp.asarray(M), leaf)
            assert inverse.dtype == jnp.float64
            np.testing.assert_array_equal(inverse, inverse.T)
            scale = np.abs(expected).max()
            np.testing.assert_allclose(inverse, expected, rtol=0, atol=1e-14 * condition * scale, err_msg=f"n={n}")
    # float32: as close to the float64 inverse as the Cholesky inverse it replaces, within a factor of 10 (it is
    # equal at condition 1e3 and 2-6x further at 1e4)
    for n, condition in ((300, 1e2), (300, 1e4), (150, 1e3)):
        M = jnp.asarray(random_spd(rng, n, condition), jnp.float32)
        expected = np.linalg.inv(np.asarray(M, np.float64))
        ours = jax.jit(spd_inverse)(M)
        cholesky = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(M), jnp.eye(n, dtype=M.dtype))
        assert ours.dtype == jnp.float32
        error = np.abs(np.asarray(ours, np.float64) - expected).max()
        cholesky_error = np.abs(np.asarray(cholesky, np.float64) - expected).max()
        assert error <= 10 * cholesky_error, (n, condition, error, cholesky_error)


def test_the_compiled_refresh_calls_no_solver():
    """The point of the inverse: XLA's own products, no LAPACK custom call (whose threads compete with XLA's)."""
    M = jnp.eye(150) * 2.0
    hlo = jax.jit(spd_inverse).lower(M).compile().as_text()
    assert SOLVER.search(hlo) is None
    assert SOLVER.search(jax.jit(jnp.linalg.inv).lower(M).compile().as_text()) is not None
