"""Kronecker factors by hand (KFLR, KFAC): each layer's input second moment ``A`` and the second moment ``G`` of the
loss-Hessian square root carried back to its output, by one walk of the square root's columns
(:data:`KRONECKER_FACTORS`); ``kron(A, G)`` approximates the layer's block of the GGN.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mnet.core.protocol import Array, LayerProtocol, Params, call_forward
from mnet.core.sums import kept_weights
from mnet.core.walk import StackedQuantity, own_rule, walk
from mnet.errors import LayerError, SettingError
from mnet.losses import Loss, with_mask


class KroneckerFactors(StackedQuantity):
    """Each layer's Kronecker factors ``A`` (its inputs' second moment) and ``G`` (the second moment of the
    loss-Hessian square root's columns carried back to its output), from the ``(C, batch, *output)`` columns. A
    unit's rule is ``kronecker_factors(params, cache, S) -> {"A": ..., "G": ...}``; a unit with parameters and no
    rule gets ``None`` (it has no Kronecker structure the walk could know of)."""

    rule = "kronecker_factors"

    def __init__(self, kept: Array | None = None):
        self.kept = kept

    def share_of(self, layer, params, caches, carried):
        """Under a padding mask the rule also gets ``kept`` (``(batch, T)`` booleans), so that its means run over
        the kept positions only; a rule that cannot take it is named rather than left to count the padding."""
        own = own_rule(layer, self.rule)
        if own is None or self.kept is None:
            return super().share_of(layer, params, caches, carried)
        if "kept" not in inspect.signature(own).parameters:
            raise LayerError(layer, "has a kronecker_factors rule without kept=, so it cannot leave padding out")
        return own(params, *caches, *carried, kept=self.kept)

    def share(self, layer, params, caches, carried):
        return None

    def tie(self, layer, first, second):
        """A matrix used twice (a tied embedding: a lookup and the read-out ``h E^T``) has a GGN block that is the sum
        of its two uses' blocks plus their cross terms: no single Kronecker product. Rather than an ad-hoc average of
        the two uses' factors, the entry is None, and K-FAC keeps the plain gradient there."""
        return None


KRONECKER_FACTORS = KroneckerFactors()


class GGNBlockFactors(KroneckerFactors):
    """:func:`kfac_factors`' walk with every ``G`` multiplied by the layer's number of output positions per example,
    so that ``kron(A, G)`` approximates the layer's block of the GGN of the mean loss whatever its positions (see
    :meth:`mnet.Dense.kronecker_factors`: the block is ``P kron(A, G)``). Under a padding mask the means run over the
    kept positions, and the factor is their number per example, ``kept / batch``. Laplace and the K-FAC influence
    preconditioner use these."""

    def share_of(self, layer, params, caches, carried):
        factors = super().share_of(layer, params, caches, carried)
        batch, positions = carried[0].shape[1], math.prod(carried[0].shape[2:-1])
        per_example = jnp.sum(kept_weights(self.kept, batch, positions, carried[0].dtype, layer)) / batch
        return jax.tree_util.tree_map(
            lambda pair: {"A": pair["A"], "G": per_example * pair["G"]} if is_factor_pair(pair) else pair,
            factors,
            is_leaf=lambda node: is_factor_pair(node) or node is None,
        )


# What the factors' ``G`` is built from: the loss Hessian's exact square root (KFLR: the GGN), one sample from the
# predictive distribution (KFAC: the Fisher, unbiased), or each example's own gradient at its true label (the
# empirical Fisher, as in Kronfluence's and EK-FAC's "empirical" setting).
KRONECKER_KINDS = ("kflr", "kfac", "empirical")


def factor_columns(
    loss: Loss, outputs: Array, targets: Array, kind: str, key: Array | None, where: str, mc_samples: int = 1
) -> Array:
    """The ``(C, batch, *output)`` columns a Kronecker walk starts from, for ``kind`` (see :data:`KRONECKER_KINDS`;
    ``"kfac"`` draws ``mc_samples`` labels per example, each column divided by ``sqrt(mc_samples)``); ``where`` names
    the caller in the error for a missing ``key``."""
    if kind == "kflr":
        return loss.hessian_sqrt(outputs, targets)
    if kind == "empirical":
        return loss.per_example_grad(outputs, targets)[None]
    if key is None:
        raise SettingError(f'{where}(kind="kfac") samples from the predictive distribution: pass key=...')
    return loss.sampled_hessian_sqrt(outputs, targets, key, mc_samples)


def check_kind(kind: Any, where: str, mc_samples: Any = 1) -> None:
    """Refuse an unknown ``kind``, and ``mc_samples`` that is not a positive int or is given for a kind that draws
    nothing (it would be ignored)."""
    if kind not in KRONECKER_KINDS:
        raise SettingError(f"{where}: kind must be one of {KRONECKER_KINDS}, got {kind!r}")
    if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
        raise SettingError(f"{where}: mc_samples must be a positive int, got {mc_samples!r}")
    if mc_samples != 1 and kind != "kfac":
        raise SettingError(f'{where}: mc_samples={mc_samples} draws labels, which only kind="kfac" does (got {kind!r})')


def is_factor_pair(node: Any) -> bool:
    """Whether ``node`` is one dense-like entry of :func:`kfac_factors`' result, ``{"A", "G"}``."""
    return isinstance(node, dict) and set(node) == {"A", "G"}


class KronBlock(NamedTuple):
    """One dense-like layer's Kronecker-factored curvature ``s kron(A, G)``, eigendecomposed:
    ``A = A_vecs diag(A_vals) A_vecs^T``, ``G = G_vecs diag(G_vals) G_vecs^T``, any scale ``s`` folded into
    ``G_vals``, so that the block's eigenvalues are ``outer(A_vals, G_vals)`` and its eigenvectors
    ``kron(A_vecs, G_vecs)``: what Laplace's posterior and the Kronecker operator of :mod:`mnet.spectrum` hold."""

    A_vals: Array
    A_vecs: Array
    G_vals: Array
    G_vecs: Array


def eigen_block(pair: dict, scale: float | Array = 1.0) -> KronBlock:
    """A ``{"A", "G"}`` entry eigendecomposed, as the block ``scale kron(A, G)``; both factors are second moments,
    so eigenvalues that rounding left below zero are clipped at zero."""
    a, U = jnp.linalg.eigh(pair["A"])
    g, V = jnp.linalg.eigh(pair["G"])
    return KronBlock(jnp.maximum(a, 0), U, scale * jnp.maximum(g, 0), V)


def stack_bias(grad: Params) -> Array:
    """A dense-like entry's ``{"W", "b"}`` (leading axes allowed) as the one matrix ``[W; b]`` that the Kronecker
    factors act on (``A`` over its rows, ``G`` over its columns); ``{"W"}`` alone, or a bare matrix (a layer whose
    params name the matrix directly, as :class:`mnet.GatedMLP`'s ``W_gate``), is ``W``."""
    if not isinstance(grad, dict):
        return grad
    if "b" not in grad:
        return grad["W"]
    return jnp.concatenate([grad["W"], grad["b"][..., None, :]], axis=-2)


def unstack_bias(matrix: Array, like: Params) -> Params:
    """The inverse of :func:`stack_bias`: ``[W; b]`` back to an entry with the keys of ``like``."""
    if not isinstance(like, dict):
        return matrix
    return {"W": matrix} if "b" not in like else {"W": matrix[..., :-1, :], "b": matrix[..., -1, :]}


def kfac_factors(net: LayerProtocol, loss: Loss, kind: str = "kflr", mc_samples: int = 1) -> Callable[..., Any]:
    """``f(params, x, targets, *, key=None)``: every layer's Kronecker factors of the GGN.

    For a dense layer ``z = a W'`` (``a`` the input with a 1 appended for the bias, ``W' = [W; b]``):
    ``A = mean_b a_b a_b^T`` and ``G = mean_b S_b S_b^T``, ``S_b`` the columns of the square root of example
    ``b``'s loss Hessian ``H_b`` carried back to ``z`` (exact, ``C`` columns, for ``kind="kflr"``; one sample
    from the loss's predictive distribution for ``kind="kfac"``, which needs ``key``, or the mean of ``mc_samples``
    draws' outer products (BackPACK's ``KFAC(mc_samples=N)``, curvlinops' ``mc_samples``); the example's own loss
    gradient at its label for ``kind="empirical"``, the empirical Fisher's factor). ``kron(A, G)``
    approximates the GGN block of ``concatenate([W, b[None]]).reshape(-1)`` and equals it for ``"kflr"`` at
    batch 1. Conv2D (its windows as positions), attention's four projections and the gated MLP's (the sequence as
    positions) follow the position convention of :meth:`mnet.Dense.kronecker_factors`: every position counts as an
    example. An :class:`mnet.Embedding` is a dense layer on one-hot ids: its ``A`` is diagonal, the ids'
    frequencies. Under a padding ``mask`` (``(batch, T)``, True at tokens) only the kept positions count, in both
    means.

    Returns:
        A pytree like ``params`` down to each layer's entry: a dense-like entry becomes ``{"A", "G"}``; an
        attention layer's entry ``{"q", "k", "v", "o"}`` of those; a parameterless layer's stays ``()``; a layer
        with parameters but no Kronecker structure (LayerNorm, RMSNorm, a user's layer without a
        ``kronecker_factors`` rule) has ``None``, and so has a matrix used twice (a tied embedding).
    """
    check_kind(kind, "kfac_factors", mc_samples)

    def kfac_factors_fn(
        params: Params,
        x: Array,
        targets: Array,
        *,
        key: Array | None = None,
        state: Any = None,
        mask: Array | None = None,
    ) -> Any:
        masked_loss, targets = with_mask(loss, targets, mask)
        outputs, cache = call_forward(net, params, x, state=state, mask=mask)
        S = factor_columns(masked_loss, outputs, targets, kind, key, "kfac_factors", mc_samples)
        quantity = KRONECKER_FACTORS if mask is None else KroneckerFactors(kept=jnp.asarray(mask))
        return walk(net, quantity, params, (cache,), (S,))[0]

    return kfac_factors_fn
