"""How two results are judged to agree: errors relative to the reference's largest entry, tolerances that scale with
the dtype's machine epsilon, and the verdict with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import jaxprs_in_params

#: Tolerance for either gradient against float64 central differences. The step h = eps^(1/3) ~ 6e-6 leaves a
#: truncation error ~ h^2 |f'''| and a rounding error ~ eps |f| / h ~ 4e-11 |f|; 1e-6 of the gradient's scale
#: sits well above both for smooth networks.
FINITE_DIFFERENCE_TOLERANCE = 1e-6

#: Leaves up to this size get every coordinate differenced; larger ones a seeded sample plus directions.
FULL_DIFFERENCE_SIZE = 64

SAMPLED_COORDINATES = 24

RANDOM_DIRECTIONS = 4


def tolerance(dtype) -> float:
    """Relative tolerance for hand-derived vs autodiff in ``dtype``, as a multiple of its machine epsilon.

    The two paths evaluate the same formulas in different orders, so they differ by rounding alone:
    a few hundred epsilons covers accumulation over wide layers and deep chains (float64: 2.2e-16 * 450
    = 1e-13; float32: 1.2e-7 * 450 = 5.4e-5; bfloat16 and float16: capped at 5e-2).
    """
    return min(450 * float(jnp.finfo(dtype).eps), 5e-2)


def working_precision(function, *args, **kwargs) -> jnp.dtype | None:
    """The least precise floating dtype that any operation of ``function(*args, **kwargs)`` computes in (None if
    it computes in no floating dtype), read from its jaxpr (tracing only: nothing runs).

    Mixed precision keeps float32 parameters and gradients while the products round to bfloat16, so the dtype of
    the gradient alone would judge bfloat16 rounding by float32's tolerance; this is the dtype to judge it by.
    """
    found: set = set()

    def visit(jaxpr) -> None:
        for equation in jaxpr.eqns:
            for var in equation.outvars:
                dtype = getattr(var.aval, "dtype", None)
                if dtype is not None and jnp.issubdtype(dtype, jnp.inexact):
                    found.add(jnp.dtype(dtype))
            for inner in jaxprs_in_params(equation.params):
                visit(inner)

    visit(jax.make_jaxpr(function)(*args, **kwargs).jaxpr)
    return max(found, key=lambda dtype: float(jnp.finfo(dtype).eps), default=None)


def coarsest(*dtypes) -> jnp.dtype:
    """Of the given floating dtypes (None ignored), the one with the largest machine epsilon."""
    return max((jnp.dtype(d) for d in dtypes if d is not None), key=lambda dtype: float(jnp.finfo(dtype).eps))


def relative_error(value: Any, reference: Any) -> float:
    """``max |value - reference| / max |reference|``: the error relative to the reference's largest entry
    (entrywise ratios blow up at entries that are zero in exact arithmetic); 0 for two all-zero arrays."""
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    error = float(np.max(np.abs(value - reference), initial=0.0))
    scale = float(np.max(np.abs(reference), initial=0.0))
    return error / scale if scale > 0 else error


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a.ravel(), b.ravel()) / norms) if norms > 0 else float(np.array_equal(a, b))


@dataclass(frozen=True)
class Agreement:
    """How closely ``value`` matches ``reference``: errors, cosine similarity and norms, and the verdict."""

    max_abs_error: float
    max_rel_error: float
    cosine: float
    norm: float
    reference_norm: float
    tolerance: float
    global_scale: float = 0.0

    @property
    def ok(self) -> bool:
        """Within tolerance relative to this array's largest reference entry, or, for an array whose exact value
        is (nearly) zero, relative to ``global_scale``: the largest reference entry of the whole gradient. The
        second clause matters for leaves like an attention layer's key bias, whose gradient is zero in exact
        arithmetic (softmax ignores a shift common to a query's scores), so that both paths return rounding
        noise of the size of the other leaves' rounding."""
        if not (np.isfinite(self.max_rel_error) and np.isfinite(self.max_abs_error)):
            return False
        return bool(self.max_rel_error <= self.tolerance or self.max_abs_error <= self.tolerance * self.global_scale)

    @classmethod
    def of(cls, value, reference, tol: float, global_scale: float = 0.0) -> Agreement:
        value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
        return cls(
            max_abs_error=float(np.max(np.abs(value - reference), initial=0.0)),
            max_rel_error=relative_error(value, reference),
            cosine=cosine(value, reference),
            norm=float(np.linalg.norm(value)),
            reference_norm=float(np.linalg.norm(reference)),
            tolerance=tol,
            global_scale=global_scale,
        )


def largest_entry(tree) -> float:
    """The largest absolute entry over every floating leaf of a pytree (0 for none)."""
    return max(
        (
            float(np.max(np.abs(np.asarray(leaf, np.float64)), initial=0.0))
            for leaf in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)
        ),
        default=0.0,
    )
