"""The spectral density of a curvature operator by stochastic Lanczos quadrature (Lin, Saad and Yang 2016; Ghorbani
et al. 2019 for networks' Hessians, as PyHessian computes it).

For a unit probe ``v`` Lanczos' tridiagonal matrix ``T = U diag(theta) U^T`` after ``m`` products is a Gauss
quadrature rule for the probe's spectral measure: ``v^T f(C) v ~ sum_k tau_k f(theta_k)``, nodes ``theta_k``,
weights ``tau_k = U[0, k]^2`` (which sum to one). Averaged over Rademacher probes (normalised) this estimates
``tr(f(C)) / size``; with ``f`` a Gaussian of width ``sigma`` centred on each point of a grid it is the smoothed
density ``phi(t) = mean_probes sum_k tau_k N(t; theta_k, sigma^2)``, which integrates to one."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from matfree import decomp

from mnet.core.protocol import Array
from mnet.errors import SettingError
from mnet.spectrum.eigenvalues import check_count
from mnet.spectrum.operator import CurvatureOperator


class SpectralDensity(NamedTuple):
    """``density`` on ``grid`` (both ``(points,)``), and the quadrature ``nodes`` and ``weights``
    (``(probes, num_matvecs)``; each probe's weights sum to one), from which any other smoothing follows."""

    grid: Array
    density: Array
    nodes: Array
    weights: Array


def quadrature(operator: CurvatureOperator, key: Array, probes: int, num_matvecs: int) -> tuple[Array, Array]:
    """Each probe's Gauss quadrature nodes and weights, ``(probes, num_matvecs)`` each."""
    # custom_vjp=False: nothing here is differentiated, and the hand-derived path defines no autodiff rule.
    lanczos = decomp.tridiag_sym(num_matvecs, reortho="full", custom_vjp=False)

    def one(probe: Array) -> tuple[Array, Array]:
        _, T, *_ = lanczos(operator.matvec, probe / jnp.linalg.norm(probe))
        nodes, U = jnp.linalg.eigh(T)
        return nodes, U[0] ** 2

    signs = jax.random.rademacher(key, (probes, operator.size), operator.dtype)
    return jax.lax.map(one, signs)


def spectral_density(
    operator: CurvatureOperator,
    *,
    key: Array,
    probes: int = 10,
    num_matvecs: int = 80,
    points: int = 512,
    sigma: float | None = None,
    grid: Array | None = None,
) -> SpectralDensity:
    """The operator's smoothed spectral density.

    Arguments:
        operator: a :class:`mnet.spectrum.CurvatureOperator`.
        key: the probes' key.
        probes: the number of random probes averaged.
        num_matvecs: Lanczos steps per probe (at most the operator's size).
        points: grid points when ``grid`` is not given.
        sigma: the Gaussian kernel's width; default 1% of the nodes' range (at least a tiny positive number).
        grid: where to evaluate the density; default ``points`` points spanning the nodes' range padded by
            ``5 sigma`` on each side, so that the density's mass lies inside the grid.

    Returns:
        :class:`SpectralDensity`.
    """
    check_count(probes, "probes", 2**62)
    check_count(num_matvecs, "num_matvecs", operator.size)
    nodes, weights = quadrature(operator, key, probes, num_matvecs)
    low, high = jnp.min(nodes), jnp.max(nodes)
    if sigma is None:
        width = jnp.maximum(0.01 * (high - low), 1e-12 * jnp.maximum(jnp.abs(high), 1.0))
    elif not sigma > 0:
        raise SettingError(f"sigma must be positive, got {sigma!r}")
    else:
        width = jnp.asarray(sigma, operator.dtype)
    if grid is None:
        grid = jnp.linspace(low - 5 * width, high + 5 * width, points, dtype=operator.dtype)
    else:
        grid = jnp.asarray(grid, operator.dtype)
    kernel = jnp.exp(-0.5 * ((grid[:, None, None] - nodes[None]) / width) ** 2) / (width * jnp.sqrt(2 * jnp.pi))
    density = jnp.mean(jnp.sum(kernel * weights[None], axis=2), axis=1)
    return SpectralDensity(grid, density, nodes, weights)
