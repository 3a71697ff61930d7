"""The log marginal likelihood (evidence) of the Laplace approximation from the eigenvalues of ``s N GGN``, and its
maximum in the prior precision by bisection on the derivative's sign (the evidence is unimodal in ``alpha``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mnet.core.protocol import Array


def log_evidence(eigenvalues: Array, log_likelihood: Array, sq_norm: Array, alpha: Array) -> Array:
    eigenvalues = eigenvalues.astype(jnp.result_type(eigenvalues, alpha))
    return (
        log_likelihood
        - alpha / 2 * sq_norm
        + eigenvalues.size / 2 * jnp.log(alpha)
        - jnp.sum(jnp.log(eigenvalues + alpha)) / 2
    )


@jax.jit
def maximise_evidence(eigenvalues: Array, sq_norm: Array, lower: float, upper: float) -> Array:
    def slope(log_alpha):  # 2 alpha d/d alpha log p(D | alpha): the same sign, better scaled
        alpha = jnp.exp(log_alpha)
        return -alpha * sq_norm + jnp.sum(eigenvalues / (eigenvalues + alpha))

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        rising = slope(mid) > 0
        return jnp.where(rising, mid, lo), jnp.where(rising, hi, mid)

    lo, hi = jax.lax.fori_loop(
        0, 200, halve, (jnp.asarray(lower, eigenvalues.dtype), jnp.asarray(upper, eigenvalues.dtype))
    )
    return jnp.exp((lo + hi) / 2)
