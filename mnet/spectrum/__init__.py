"""Hessian and GGN spectra on mnet's hand-derived curvature products, for a network or one block of its
parameters: the extreme eigenpairs (Lanczos), the trace (Hutchinson, Hutch++) and the spectral density (stochastic
Lanczos quadrature); and structured approximations held as eigendecompositions (a Kronecker product or an
exact dense block per layer), with exact inverses, traces and log-determinants. The Krylov algorithms are
matfree's (pinned in the dependencies); the products are mnet's.

>>> import jax, mnet
>>> net = mnet.mlp([4, 3], activation="tanh")
>>> _, params = net.init(jax.random.key(0), (5,))
>>> x, y = jax.random.normal(jax.random.key(1), (16, 5)), jax.numpy.arange(16) % 3
>>> H = mnet.spectrum.curvature_operator(net, mnet.losses.softmax_cross_entropy, params, x, y)
>>> top = mnet.spectrum.top_eigenpairs(H, 2, key=jax.random.key(2))
>>> top.values.shape, top.vectors.shape
((2,), (2, 39))
"""

from mnet.spectrum.density import SpectralDensity, spectral_density
from mnet.spectrum.eigenvalues import Eigenpairs, top_eigenpairs
from mnet.spectrum.operator import CurvatureOperator, curvature_operator
from mnet.spectrum.structured import DenseBlock, StructuredOperator, block_diagonal, kronecker_operator
from mnet.spectrum.trace import TraceEstimate, trace

__all__ = [
    "CurvatureOperator",
    "DenseBlock",
    "Eigenpairs",
    "SpectralDensity",
    "StructuredOperator",
    "TraceEstimate",
    "block_diagonal",
    "curvature_operator",
    "kronecker_operator",
    "spectral_density",
    "top_eigenpairs",
    "trace",
]
