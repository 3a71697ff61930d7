"""The trace of a curvature operator, estimated from products with random vectors.

Hutchinson: ``tr(C) = E[v^T C v]`` for Rademacher ``v`` (matfree's ``estimator_monte_carlo`` with
``monte_carlo_trace``), unbiased, with variance ``2 (||C||_F^2 - sum_i C_ii^2) / samples``. Hutch++ (Meyer et al.
2021): a third of the products sketch the dominant range ``Q`` (``C S``, orthonormalised), whose part of the trace
``tr(Q^T C Q)`` is exact; Hutchinson on the deflated rest ``(I - Q Q^T) C (I - Q Q^T)`` takes the last third.
For a curvature whose spectrum decays (a network's Hessian or GGN) the error falls as ``1/samples`` rather than
``1/sqrt(samples)``."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from matfree import stochtrace

from mnet.core.protocol import Array
from mnet.errors import SettingError
from mnet.spectrum.operator import CurvatureOperator

METHODS = ("hutchinson", "hutch++")


class TraceEstimate(NamedTuple):
    """The estimate and its standard error (for Hutch++ the Hutchinson part's; the sketched part is exact)."""

    value: Array
    standard_error: Array


def rademacher(key: Array, count: int, operator: CurvatureOperator) -> Array:
    return jax.random.rademacher(key, (count, operator.size), operator.dtype)


def trace(operator: CurvatureOperator, *, key: Array, samples: int = 100, method: str = "hutchinson") -> TraceEstimate:
    """An unbiased estimate of the operator's trace.

    Arguments:
        operator: a :class:`mnet.spectrum.CurvatureOperator`.
        key: the probes' key.
        samples: the number of products with the operator (for ``"hutch++"`` at least 3).
        method: ``"hutchinson"`` or ``"hutch++"``.

    Returns:
        :class:`TraceEstimate`.
    """
    if method not in METHODS:
        raise SettingError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < (3 if method == "hutch++" else 2):
        raise SettingError(f"samples must be an int >= {3 if method == 'hutch++' else 2} for {method}, got {samples!r}")
    if method == "hutchinson":
        v0 = jnp.zeros((operator.size,), operator.dtype)
        estimate = stochtrace.estimator_monte_carlo_mean_and_sem(
            stochtrace.monte_carlo_trace(), stochtrace.sampler_signs(v0, num=samples)
        )
        value, error = estimate(operator.matvec, key)
        return TraceEstimate(value, error)
    return hutch_plus_plus(operator, key, samples)


def hutch_plus_plus(operator: CurvatureOperator, key: Array, samples: int) -> TraceEstimate:
    sketch_key, probe_key = jax.random.split(key)
    rank = min(samples // 3, operator.size)
    rest = samples - 2 * rank
    sketch = jax.vmap(operator.matvec)(rademacher(sketch_key, rank, operator))
    Q = jnp.linalg.qr(sketch.T)[0]  # (size, rank): the dominant range
    exact = jnp.trace(Q.T @ jax.vmap(operator.matvec)(Q.T).T)
    probes = rademacher(probe_key, rest, operator)
    deflated = probes - (probes @ Q) @ Q.T
    forms = jnp.sum(deflated * jax.vmap(operator.matvec)(deflated), axis=1)
    return TraceEstimate(exact + jnp.mean(forms), jnp.std(forms, ddof=1) / jnp.sqrt(rest))
