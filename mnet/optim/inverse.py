"""The inverse of a symmetric positive definite matrix from matrix products alone: K-FAC's refresh.

JAX's CPU Cholesky and triangular solves are LAPACK calls into SciPy's OpenBLAS, which starts threads of its own
beside XLA's. On a machine whose cores XLA already keeps busy the two pools compete: inside a K-FAC training scan on
2 cores the six Cholesky inverses of an MLP 784-512-512-10's factors took 80 to 120 ms a refresh, against 32 ms
alone. This inverse runs inside XLA, as products that XLA's own threads carry out, in 17 to 21 ms alone, and ten
training steps with one refresh fell from 187 to 100 ms (BENCHMARKS.md).

For ``M = [[A, B], [B^T, C]]`` with ``A`` and the Schur complement ``S = C - B^T A^-1 B`` positive definite (both
are, when ``M`` is)::

    M^-1 = [[A^-1 + A^-1 B S^-1 B^T A^-1,  -A^-1 B S^-1],
            [-S^-1 B^T A^-1,                S^-1       ]]

so with ``P = A^-1 B`` and ``X = P S^-1`` the inverse is ``[[A^-1 + X P^T, -X], [-X^T, S^-1]]``: four products and
two inverses of half the size, about ``4 n^3 / 3`` flops in all (a Cholesky factorization and two triangular solves
against the identity take ``7 n^3 / 3``). The recursion stops at blocks of at most ``leaf`` rows, which Gauss-Jordan
sweeps invert in a loop of rank-1 updates: sweeping pivot ``k`` of a symmetric ``X`` maps ``X_ij`` to ``X_ij - X_ik
X_kj / X_kk`` off row and column ``k``, ``X_ik`` to ``X_ik / X_kk`` on them and ``X_kk`` to ``-1 / X_kk``; after
every pivot ``X`` is ``-M^-1``. Neither step pivots: on a positive definite matrix every pivot is a positive Schur
complement, as in Cholesky's factorization, which does not pivot either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mnet.core.protocol import Array

# Rows at which the recursion sweeps instead. 64 inverts an MLP's six factors in 16.5 ms against 20.6, but compiles
# in 3.4 s against 2.3 (a loop per leaf); within a training scan the two are alike.
LEAF = 128


def spd_inverse(M: Array, leaf: int = LEAF) -> Array:
    """``M^-1`` for a symmetric positive definite ``M`` of shape ``(n, n)``, symmetric to the last bit, in ``M``'s
    dtype, from products and Gauss-Jordan sweeps (no LAPACK; see the module docstring for the derivation).

    Arguments:
        M: a symmetric positive definite matrix (a damped Kronecker factor). Only its values are used as given: an
            indefinite ``M`` gives a meaningless result, as its Cholesky factorization would give NaN.
        leaf: the largest block inverted by sweeps.

    Returns:
        The inverse, ``(n, n)``, equal to its own transpose.
    """
    inverse = _schur_inverse(M, leaf)
    return (inverse + inverse.T) / 2


def _schur_inverse(M: Array, leaf: int) -> Array:
    n = M.shape[0]
    if n <= leaf:
        return _sweep_inverse(M)
    half = n // 2
    A, B, C = M[:half, :half], M[:half, half:], M[half:, half:]
    A_inverse = _schur_inverse(A, leaf)
    P = A_inverse @ B
    S = C - B.T @ P
    S_inverse = _schur_inverse((S + S.T) / 2, leaf)
    X = P @ S_inverse
    return jnp.block([[A_inverse + X @ P.T, -X], [-X.T, S_inverse]])


def _sweep_inverse(M: Array) -> Array:
    index = jnp.arange(M.shape[0])

    def sweep(k, X):
        column = jax.lax.dynamic_index_in_dim(X, k, axis=1, keepdims=False)
        pivot = column[k]
        scaled = column / pivot
        on_row, on_column = (index == k)[:, None], (index == k)[None, :]
        updated = X - jnp.outer(column, scaled)
        updated = jnp.where(on_row, scaled[None, :], jnp.where(on_column, scaled[:, None], updated))
        return jnp.where(on_row & on_column, -1 / pivot, updated)

    return -jax.lax.fori_loop(0, M.shape[0], sweep, M)
