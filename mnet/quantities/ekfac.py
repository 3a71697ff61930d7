"""EK-FAC by hand: the eigenbases of each layer's Kronecker factors, and the eigenvalues corrected to the exact
diagonal of the layer's GGN block in that basis (George et al. 2018; Grosse et al. 2023 for influence functions).

Derivation. For a dense layer ``z = a W'`` (``a = [x, 1]``, ``W' = [W; b]``) K-FAC approximates the GGN block of
``W'`` by ``kron(A, G)``. With ``A = Q_A diag(l_A) Q_A^T`` and ``G = Q_G diag(l_G) Q_G^T`` that is
``Q diag(l_A (x) l_G) Q^T``, ``Q = kron(Q_A, Q_G)``: the Kronecker-factored eigenbasis (KFE), with eigenvalues
that are products. EK-FAC keeps the basis and replaces the eigenvalues by the exact diagonal of the block in it,

    S_ij = mean_b sum_c ((Q_A^T G_bc Q_G)_ij)^2,      G_bc = sum_t a_bt s_bct^T,

``G_bc`` the gradient of column ``c`` of example ``b``'s loss-Hessian square root (``s_bct`` that column carried
back to ``z`` at position ``t``), or of its loss itself for the empirical Fisher. The rotated gradient is
``sum_t (a_bt Q_A)^T (s_bct Q_G)``: the layer's own gradient rule applied to rotated operands, so no gradient is
ever built in the original basis. Without positions it is rank one, and its square is the outer product of the
squares, ``S = mean_b (a_b Q_A)^2 (x) sum_c (s_bc Q_G)^2``: one product of squares, nothing per example. At batch 1
``A`` has rank one, ``a Q_A`` a single nonzero entry, and ``S`` is then the exact block's spectrum: EK-FAC equals
the GGN block, where K-FAC equals it only for KFLR columns.

The walk. The correction walks the same square-root columns as :func:`mnet.kfac_factors`, and every unit's rule
``eigen_correction(params, cache, S, basis)`` needs its own eigenbasis. A walk hands a unit its params and caches,
not entries of other trees, so the bases are given to the units in the order the walk reaches them: one abstract
walk (``jax.eval_shape``, nothing computed) first records where in the result each visit's entry lands
(:class:`VisitOrder`), and the bases are read from those places.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mnet.core.paths import flatten_with_keys
from mnet.core.protocol import Array, LayerProtocol, Params, call_forward
from mnet.core.walk import StackedQuantity, own_rule, walk
from mnet.losses import Loss, with_mask
from mnet.quantities.kronecker import check_kind, factor_columns, is_factor_pair, kfac_factors


def is_eigen_block(node: Any) -> bool:
    """Whether ``node`` is one entry of :func:`ekfac_factors`' result, ``{"QA", "QG", "S"}``."""
    return isinstance(node, dict) and set(node) == {"QA", "QG", "S"}


def is_basis_pair(node: Any) -> bool:
    """An entry of a tree of eigenbases (``{"A": Q_A, "G": Q_G}``), or None where a layer has none."""
    return is_factor_pair(node) or node is None


class Visit:
    """Which visit of the walk produced an entry (a tree leaf of its own, not a pytree node)."""

    def __init__(self, index: int):
        self.index = index


class VisitOrder(StackedQuantity):
    """Each unit with parameters gets the number of its visit as its share; run abstractly, so it costs nothing."""

    rule = "eigen_correction"

    def __init__(self) -> None:
        self.visits = 0

    def share_of(self, layer, params, caches, carried):
        self.visits += 1
        return Visit(self.visits - 1)

    def tie(self, layer, first, second):
        return None  # a tied matrix has no Kronecker block (see KroneckerFactors.tie)


class EigenCorrection(StackedQuantity):
    """The corrected eigenvalues ``S`` of every unit whose visit has an eigenbasis in ``bases`` (a list in visit
    order); None at the others, and at a unit without an ``eigen_correction`` rule."""

    rule = "eigen_correction"

    def __init__(self, bases: list[Any]):
        self.bases, self.visits = bases, 0

    def share_of(self, layer, params, caches, carried):
        basis = self.bases[self.visits]
        self.visits += 1
        own = own_rule(layer, self.rule)
        if basis is None or own is None:
            return None
        return own(params, *caches, *carried, basis)

    def tie(self, layer, first, second):
        return None


def entry_at(tree: Any, keys: tuple) -> Any:
    """The subtree of ``tree`` at a path of plain keys and indices, or None where ``tree`` ends before it."""
    for key in keys:
        if isinstance(tree, dict) and key in tree:
            tree = tree[key]
        elif isinstance(tree, list | tuple) and isinstance(key, int) and key < len(tree):
            tree = tree[key]
        else:
            return None
    return tree


def bases_in_visit_order(net: LayerProtocol, params: Params, x: Array, columns: Array, bases: Any) -> list[Any]:
    """The eigenbasis for each visit of the correction walk, read from ``bases`` (a tree like
    :func:`mnet.kfac_factors`' result) where that visit's entry lands."""
    found: list[Any] = []

    def trace(p: Params, inputs: Array, S: Array) -> Array:
        _, cache = call_forward(net, p, inputs)
        order = VisitOrder()
        found.append((walk(net, order, p, (cache,), (S,))[0], order.visits))
        return S

    jax.eval_shape(trace, params, x, columns)
    tree, visits = found[0]
    in_order: list[Any] = [None] * visits
    for keys, visit in flatten_with_keys(tree, is_leaf=lambda node: isinstance(node, Visit)):
        if isinstance(visit, Visit):
            basis = entry_at(bases, keys)
            # A unit's entry is one pair (a dense layer), or a dict holding pairs (a recurrent layer's two products).
            holds_pairs = any(is_factor_pair(node) for node in jax.tree_util.tree_leaves(basis, is_leaf=is_factor_pair))
            in_order[visit.index] = basis if holds_pairs else None
    return in_order


def eigenbases(factors: Any) -> Any:
    """Every ``{"A", "G"}`` entry of a :func:`mnet.kfac_factors` result replaced by ``{"A": Q_A, "G": Q_G}``, the
    eigenvectors of each factor (columns, eigenvalues ascending); the rest of the tree kept.

    Arguments:
        factors: a tree like :func:`mnet.kfac_factors`' result (one batch's, or a mean over many).

    Returns:
        The tree of eigenbases that :func:`eigen_correction` takes.
    """
    return jax.tree_util.tree_map(
        lambda pair: (
            {"A": jnp.linalg.eigh(pair["A"])[1], "G": jnp.linalg.eigh(pair["G"])[1]} if is_factor_pair(pair) else pair
        ),
        factors,
        is_leaf=is_basis_pair,
    )


def eigen_correction(net: LayerProtocol, loss: Loss, kind: str = "kflr") -> Callable[..., Any]:
    """``f(params, x, targets, bases, *, key=None, state=None, mask=None)``: EK-FAC's corrected eigenvalues
    ``S = mean_b sum_c ((Q_A^T G_bc Q_G)_ij)^2`` of every layer with a basis in ``bases``, by one forward pass and
    one walk of ``kind``'s columns (as :func:`mnet.kfac_factors`: ``"kflr"`` the exact square root, ``"kfac"`` one
    sample, which needs ``key``, ``"empirical"`` each example's gradient at its label).

    ``S`` is the diagonal of the layer's GGN block (of the mean loss) in the basis ``kron(Q_A, Q_G)``: the mean is
    over examples, each example's gradient summed over its positions (a sequence's tokens, a convolution's
    windows), so that with positions ``S`` is the exact diagonal in the basis, not K-FAC's per-position
    approximation. Averaged over batches (weighted by their sizes) it is the dataset's.

    Arguments:
        net, loss: the network and its loss.
        kind: the columns, one of ``"kflr"``, ``"kfac"``, ``"empirical"``.

    Returns:
        The function; its result is a tree like :func:`mnet.kfac_factors`' with ``S`` (shaped like the entry's
        ``[W; b]``) wherever ``bases`` has a pair, and None at every other layer with parameters.
    """
    check_kind(kind, "eigen_correction")

    def eigen_correction_fn(
        params: Params,
        x: Array,
        targets: Array,
        bases: Any,
        *,
        key: Array | None = None,
        state: Any = None,
        mask: Array | None = None,
    ) -> Any:
        masked_loss, targets = with_mask(loss, targets, mask)
        outputs, cache = call_forward(net, params, x, state=state, mask=mask)
        columns = factor_columns(masked_loss, outputs, targets, kind, key, "eigen_correction")
        in_order = bases_in_visit_order(net, params, x, columns, bases)
        return walk(net, EigenCorrection(in_order), params, (cache,), (columns,))[0]

    return eigen_correction_fn


def ekfac_factors(net: LayerProtocol, loss: Loss, kind: str = "kflr") -> Callable[..., Any]:
    """``f(params, x, targets, *, key=None, state=None, mask=None)``: every layer's EK-FAC approximation of its GGN
    block, ``kron(Q_A, Q_G) diag(vec(S)) kron(Q_A, Q_G)^T``, from one batch: the factors
    (:func:`mnet.kfac_factors`), their eigenbases, and the corrected eigenvalues (:func:`eigen_correction`) from
    the same columns. With ``kind="kfac"`` both use the same sample (one ``key``).

    Over many batches, average the factors first, take :func:`eigenbases` of the mean, then average
    :func:`eigen_correction` in that basis (as :func:`mnet.influence` does).

    Arguments:
        net, loss: the network and its loss.
        kind: ``"kflr"`` (the GGN), ``"kfac"`` (the Fisher, one sample) or ``"empirical"`` (the empirical Fisher).

    Returns:
        The function; its result is a tree like :func:`mnet.kfac_factors`' with ``{"QA", "QG", "S"}`` at every
        Kronecker-factored entry (``QA`` ``(n_in [+1], n_in [+1])``, ``QG`` ``(n_out, n_out)``, ``S`` shaped like
        ``[W; b]``), None at other layers with parameters, ``()`` at parameterless ones.
    """
    factors_fn, correction_fn = kfac_factors(net, loss, kind), eigen_correction(net, loss, kind)

    def ekfac_factors_fn(
        params: Params,
        x: Array,
        targets: Array,
        *,
        key: Array | None = None,
        state: Any = None,
        mask: Array | None = None,
    ) -> Any:
        bases = eigenbases(factors_fn(params, x, targets, key=key, state=state, mask=mask))
        corrected = correction_fn(params, x, targets, bases, key=key, state=state, mask=mask)
        return combine(bases, corrected)

    return ekfac_factors_fn


def combine(bases: Any, corrected: Any) -> Any:
    """``{"QA", "QG", "S"}`` wherever both trees have an entry; None where either has none."""

    def entry(basis: Any, S: Any) -> Any:
        if not is_factor_pair(basis):
            return basis
        return None if S is None else {"QA": basis["A"], "QG": basis["G"], "S": S}

    return jax.tree_util.tree_map(entry, bases, corrected, is_leaf=is_basis_pair)


def eigenbasis_solve(QA: Array, QG: Array, S: Array, M: Array, damping: float | Array) -> Array:
    """``(kron(Q_A, Q_G) diag(vec S) kron(Q_A, Q_G)^T + damping I)^-1 vec(M)`` for every ``M`` of a stack (leading
    axes allowed), as ``Q_A ((Q_A^T M Q_G) / (S + damping)) Q_G^T``: four products, no Kronecker matrix. With ``S``
    the products of the factors' eigenvalues it is K-FAC's damped inverse; with the corrected ones, EK-FAC's."""
    rotated = jnp.einsum("ia,...ij,jb->...ab", QA, M, QG) / (S + damping)
    return jnp.einsum("ia,...ab,jb->...ij", QA, rotated, QG)
