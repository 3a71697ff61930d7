"""The extreme eigenvalues and eigenvectors of a curvature operator by Lanczos' method with full
reorthogonalisation (matfree's ``tridiag_sym`` and ``eigh_partial``): ``num_matvecs`` products build a Krylov basis,
and the Ritz pairs of the tridiagonal matrix approximate the operator's extreme eigenpairs, the largest and the
smallest first. With ``num_matvecs`` equal to the operator's size the decomposition is exact."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from matfree import decomp, eig

from mnet.core.protocol import Array
from mnet.errors import SettingError
from mnet.spectrum.operator import CurvatureOperator

WHICH = ("largest", "smallest", "magnitude")


class Eigenpairs(NamedTuple):
    """``values`` ``(k,)`` and ``vectors`` ``(k, size)`` (rows of unit norm; ``operator.to_tree`` makes a row a
    tree like the params), in the order asked for."""

    values: Array
    vectors: Array


def check_count(value: object, name: str, size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingError(f"{name} must be a positive int, got {value!r}")
    if value > size:
        raise SettingError(f"{name} = {value} is larger than the number of parameters in the operator ({size})")
    return value


def start_vector(key: Array, operator: CurvatureOperator) -> Array:
    return jax.random.normal(key, (operator.size,), operator.dtype)


def top_eigenpairs(
    operator: CurvatureOperator,
    k: int,
    *,
    key: Array,
    num_matvecs: int | None = None,
    which: str = "largest",
) -> Eigenpairs:
    """The ``k`` extreme eigenvalues of the operator and their eigenvectors, by Lanczos.

    Arguments:
        operator: a :class:`mnet.spectrum.CurvatureOperator` (the Hessian or GGN, of a network or one block).
        k: how many; at most the operator's size.
        key: the random start vector's key.
        num_matvecs: the Krylov depth, ``k <= num_matvecs <= size`` (default ``min(size, max(3 k, k + 40))``); the
            Ritz values converge to the extreme eigenvalues first, so a depth of a few times ``k`` usually gives
            them to many digits.
        which: ``"largest"`` (algebraically, as PyHessian's top eigenvalues), ``"smallest"``, or ``"magnitude"``.

    Returns:
        :class:`Eigenpairs`, largest first (smallest first for ``"smallest"``).
    """
    check_count(k, "k", operator.size)
    if which not in WHICH:
        raise SettingError(f"which must be one of {WHICH}, got {which!r}")
    depth = min(operator.size, max(3 * k, k + 40)) if num_matvecs is None else num_matvecs
    check_count(depth, "num_matvecs", operator.size)
    if depth < k:
        raise SettingError(f"num_matvecs = {depth} is smaller than k = {k}: Lanczos finds at most num_matvecs pairs")
    # custom_vjp=False: the hand-derived path defines no autodiff rule (nothing here is differentiated).
    lanczos = decomp.tridiag_sym(depth, reortho="full", custom_vjp=False)
    values, vectors = eig.eigh_partial(lanczos)(operator.matvec, start_vector(key, operator))
    if which == "largest":
        order = jnp.argsort(-values)
    elif which == "smallest":
        order = jnp.argsort(values)
    else:
        order = jnp.argsort(-jnp.abs(values))
    return Eigenpairs(values[order[:k]], vectors[order[:k]])
