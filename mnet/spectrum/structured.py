"""Structured curvature: a block per layer, each held as its eigendecomposition, so that the operator, its damped
inverse and any function of it apply exactly, and its trace and log-determinant are sums over eigenvalues
(curvlinops' ``KFACLinearOperator`` with ``inverse``, ``trace`` and ``logdet``, and its block-diagonal Hessian).

Two structures:

* **Kronecker** (:func:`kronecker_operator`): each dense-like layer's GGN block approximated by ``kron(A, G)``
  (KFLR, KFAC or the empirical Fisher's factors, :func:`mnet.kfac_factors`, with the positions of a sequence or
  a convolution's windows folded into ``G`` so that the product approximates the block of the mean loss). With
  ``A = U diag(a) U^T`` and ``G = V diag(g) V^T`` the block is ``kron(U, V) diag(a g^T) kron(U, V)^T``, so for the
  layer's matrix ``M = [W; b]`` (``vec`` row by row, the layout of the flat vector)

      f(kron(A, G)) vec(M) = vec(U (f(a g^T) * (U^T M V)) V^T)

  for any function ``f`` of the eigenvalues: the product itself (``f(l) = l``), the damped inverse
  (``1 / (l + damping)``), a power. Four small products per layer; no Kronecker matrix is formed. The trace is
  ``tr A tr G`` and the log-determinant ``sum_ij log(a_i g_j + damping)``.
* **Block-diagonal** (:func:`block_diagonal`): the exact Hessian's or GGN's diagonal block of each layer (or of
  any leaves named), each a dense matrix built from the hand-derived products (one product per column), then
  eigendecomposed: ``f(B) v = Q f(l) Q^T v``.

The flat vector of a structured operator is its blocks' parameters one block after another (a layer's leaves in
tree order: ``W`` then ``b``); ``to_tree`` and ``to_flat`` convert, and the operator is a
:class:`mnet.spectrum.CurvatureOperator`, so Lanczos, the trace estimators and the density take it too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mnet.core.chunks import chunks
from mnet.core.paths import flatten_with_keys
from mnet.core.protocol import Array, LayerProtocol, Params, call_forward
from mnet.core.walk import units, walk
from mnet.errors import SettingError
from mnet.losses import Loss, with_mask
from mnet.quantities.kronecker import (
    GGNBlockFactors,
    KronBlock,
    check_kind,
    eigen_block,
    factor_columns,
    is_factor_pair,
)
from mnet.spectrum.operator import (
    CurvatureOperator,
    FlatLayout,
    check_batches,
    check_data,
    curvature_operator,
    flat_layout,
    in_block,
    leaf_name,
    read_batches,
)


class DenseBlock(NamedTuple):
    """One dense symmetric block ``Q diag(values) Q^T`` (``vectors = Q``, eigenvectors in columns)."""

    values: Array
    vectors: Array


def block_eigenvalues(block: DenseBlock | KronBlock) -> Array:
    """The block's eigenvalues, in the order of its eigenvectors (for a Kronecker block ``outer(a, g)`` row by row)."""
    if isinstance(block, KronBlock):
        return jnp.outer(block.A_vals, block.G_vals).reshape(-1)
    return block.values


def apply_function(block: DenseBlock | KronBlock, v: Array, f: Callable[[Array], Array]) -> Array:
    """``f(B) v`` for the block ``B`` and a flat vector ``v`` of its size (module text)."""
    if isinstance(block, KronBlock):
        U, V = block.A_vecs, block.G_vecs
        rotated = U.T @ v.reshape(U.shape[0], V.shape[0]) @ V
        scaled = f(jnp.outer(block.A_vals, block.G_vals)) * rotated
        return (U @ scaled @ V.T).reshape(-1)
    Q = block.vectors
    return Q @ (f(block.values) * (Q.T @ v))


def identity(values: Array) -> Array:
    return values


@dataclass(frozen=True)
class StructuredOperator(CurvatureOperator):
    """A :class:`mnet.spectrum.CurvatureOperator` made of diagonal blocks held as eigendecompositions
    (:class:`DenseBlock` or :class:`mnet.laplace.KronBlock`), the operator being ``f(C)`` for the structured
    curvature ``C`` and a function ``f`` of its eigenvalues (``f(l) = l`` as built). ``blocks`` lists every block
    with the names of its leaves; ``to_flat`` is ``to_tree``'s inverse on the covered leaves."""

    blocks: tuple = ()
    block_names: tuple = ()
    to_flat: Callable[[Params], Array] = field(default=lambda tree: tree)
    function: Callable[[Array], Array] = identity

    def eigenvalues(self) -> Array:
        """Every eigenvalue of the operator, block after block: ``f`` of the curvature's."""
        return jnp.concatenate([self.function(block_eigenvalues(b)) for b in self.blocks])

    def trace(self) -> Array:
        """The exact trace, the sum of the eigenvalues."""
        return jnp.sum(self.eigenvalues())

    def logdet(self) -> Array:
        """The exact log-determinant, ``sum log l``: minus infinity for a singular operator, NaN where an eigenvalue
        is negative (see :meth:`slogdet`)."""
        return jnp.sum(jnp.log(self.eigenvalues()))

    def slogdet(self) -> tuple[Array, Array]:
        """``(sign, log |det|)``, as ``jnp.linalg.slogdet``: for an indefinite operator (a Hessian's blocks)."""
        values = self.eigenvalues()
        return jnp.prod(jnp.sign(values)), jnp.sum(jnp.log(jnp.abs(values)))

    def frobenius_norm(self) -> Array:
        """``||C||_F``, the root of the sum of the squared eigenvalues (for a Kronecker block ``||A|| ||G||``)."""
        return jnp.sqrt(jnp.sum(self.eigenvalues() ** 2))

    def damped(self, damping: float | Array) -> StructuredOperator:
        """``C + damping I``."""
        return self.mapped(lambda values: values + damping, "damped")

    def inverse(self, damping: float | Array = 0.0) -> StructuredOperator:
        """``(C + damping I)^-1``, exactly (an eigenvalue of ``C + damping I`` that is zero gives infinities)."""
        return self.mapped(lambda values: 1 / (values + damping), "inverse")

    def power(self, exponent: float, damping: float | Array = 0.0) -> StructuredOperator:
        """``(C + damping I)^exponent`` (``-1/2`` for a whitening, ``1/2`` for sampling ``N(0, C)``)."""
        return self.mapped(lambda values: (values + damping) ** exponent, "power")

    def mapped(self, g: Callable[[Array], Array], name: str) -> StructuredOperator:
        """The operator ``g(f(C))``, named ``name`` after this one."""
        function = compose(g, self.function)
        return replace(
            self, matvec=block_matvec(self.blocks, function), function=function, curvature=f"{name} {self.curvature}"
        )


def compose(g: Callable[[Array], Array], f: Callable[[Array], Array]) -> Callable[[Array], Array]:
    return lambda values: g(f(values))


def block_matvec(blocks: tuple, function: Callable[[Array], Array]) -> Callable[[Array], Array]:
    """``v -> f(C) v`` over ``blocks`` laid out one after another."""
    sizes = [int(block_eigenvalues(b).shape[0]) for b in blocks]
    bounds = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]

    def matvec(v: Array) -> Array:
        parts = jnp.split(v, bounds)
        return jnp.concatenate([apply_function(b, part, function) for b, part in zip(blocks, parts)])

    return matvec


def structured(blocks: tuple, block_names: tuple, layout: FlatLayout, curvature: str) -> StructuredOperator:
    """The operator ``C`` over ``blocks`` laid out one after another in ``layout``."""
    return StructuredOperator(
        block_matvec(blocks, identity),
        layout.size,
        layout.dtype,
        layout.names,
        layout.to_tree,
        curvature,
        blocks=tuple(blocks),
        block_names=tuple(block_names),
        to_flat=layout.to_flat,
    )


def leaves_under(params: Params, prefix: str) -> list[int]:
    """The indices of the leaves of ``params`` under ``prefix`` (a whole-key prefix), in tree order."""
    names = (leaf_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])
    return [i for i, name in enumerate(names) if in_block(name, prefix)]


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def batch_factors(net, loss, kind, mc_samples, params, x, targets, key, mask, state):
    """One batch's factors with its positions folded into ``G`` (:class:`mnet.quantities.kronecker.GGNBlockFactors`),
    means over the batch."""
    masked_loss, targets = with_mask(loss, targets, mask)
    outputs, cache = call_forward(net, params, x, state=state, mask=mask)
    S = factor_columns(masked_loss, outputs, targets, kind, key, "kronecker_operator", mc_samples)
    return walk(net, GGNBlockFactors(kept=mask), params, (cache,), (S,))[0]


def data_batches(x, targets, batch_size, batches, mask) -> tuple[Callable[[], Iterable], int, int]:
    """The data as a function returning a fresh iterator of ``(x, targets, mask)`` batches (arrays cut into chunks
    of ``batch_size``), their total number of examples and their number."""
    if batches is not None:
        fresh, n, count = read_batches(batches)
        return lambda: ((*batch, None)[:3] for batch in fresh()), n, count
    n = jnp.shape(x)[0]
    parts = chunks(n, n if batch_size is None else batch_size)
    return lambda: ((x[p], targets[p], None if mask is None else mask[p]) for p in parts), n, len(parts)


def mean_factors(net, loss, params, data, kind, mc_samples, key, state) -> Any:
    """The factors averaged over every batch of ``data`` (:func:`data_batches`), each weighted by its number of
    examples (for ``"kfac"`` each batch draws with ``key`` folded with its index; a single batch with ``key``
    itself, as :func:`mnet.kfac_factors`)."""
    fresh, n, count = data
    total = None
    for i, (x, targets, mask) in enumerate(fresh()):
        batch_key = key if key is None or count == 1 else jax.random.fold_in(key, i)
        factors = batch_factors(
            net, loss, kind, mc_samples, params, jnp.asarray(x), jnp.asarray(targets), batch_key, mask, state
        )
        share = jnp.shape(x)[0] / n
        weighted = jax.tree_util.tree_map(lambda f, share=share: f * share, factors)
        total = weighted if total is None else jax.tree_util.tree_map(jnp.add, total, weighted)
    return total


def chosen(name: str, block: str | tuple | list | None) -> bool:
    """Whether an entry or leaf ``name`` lies in ``block``: None, a prefix, or several prefixes."""
    if block is None or isinstance(block, str):
        return in_block(name, block)
    return any(in_block(name, one) for one in block)


def kronecker_operator(
    net: LayerProtocol,
    loss: Loss,
    params: Params,
    x: Array | None = None,
    targets: Array | None = None,
    *,
    kind: str = "kflr",
    mc_samples: int = 1,
    key: Array | None = None,
    block: str | tuple[str, ...] | None = None,
    batch_size: int | None = None,
    batches: Any = None,
    mask: Array | None = None,
    state: Any = None,
) -> StructuredOperator:
    """The Kronecker-factored GGN of the mean loss over the data as a :class:`StructuredOperator`: every
    dense-like layer's block ``kron(A, G)`` (module text), with exact ``inverse(damping)``, ``trace()``,
    ``logdet()`` and powers.

    Arguments:
        net, loss, params: the network, its loss and the point.
        x, targets: the data (or ``batches=``, as :func:`mnet.spectrum.curvature_operator` takes it); the factors
            are the means over all of it.
        kind: ``"kflr"`` (the loss Hessian's exact square root), ``"kfac"`` (``mc_samples`` labels drawn from the
            predictive distribution; needs ``key``) or ``"empirical"`` (each example's gradient at its label).
        block: None for every layer; else the name of a layer's entry (``"0"``, ``"2.q"``) or a prefix of them, or
            several such names.
        batch_size: the factors are computed a chunk of this many examples at a time.
        mask: a ``(n, T)`` padding mask (True at tokens) for the arrays; a batch of ``batches`` carries its own.
        state: a BatchNorm's running statistics.

    Returns:
        A :class:`StructuredOperator` over the chosen layers' parameters (each layer's ``W`` then ``b``). A chosen
        layer with parameters but no Kronecker structure (LayerNorm, a matrix used twice) is refused by name:
        choose the others with ``block=``, or take its exact block from :func:`block_diagonal`.
    """
    check_kind(kind, "kronecker_operator", mc_samples)
    check_data(x, targets, batches, "kronecker_operator")
    data = data_batches(x, targets, batch_size, batches, mask)
    factors = mean_factors(net, loss, params, data, kind, mc_samples, key, state)
    every = flatten_with_keys(factors, is_leaf=lambda node: is_factor_pair(node) or node is None)
    named = [(".".join(map(str, path)), node) for path, node in every]
    entries = [(name, node) for name, node in named if chosen(name, block)]
    if not entries:
        raise SettingError(f"kronecker_operator: block {block!r} names no layer with parameters")
    missing = [name for name, node in entries if node is None]
    if missing:
        raise SettingError(
            f"kronecker_operator: the layers at {', '.join(missing)} have parameters but no Kronecker factors; leave "
            "them out with block=, or take their exact blocks from block_diagonal"
        )
    indices = [leaves_under(params, name) for name, _ in entries]
    layout = flat_layout(params, [i for group in indices for i in group])
    return structured(
        tuple(eigen_block(node) for _, node in entries), tuple(name for name, _ in entries), layout, f"{kind} kronecker"
    )


def entry_names(net: LayerProtocol, params: Params, example: Array) -> list[str]:
    """The name of every unit's entry that holds parameters, in tree order."""
    names = [".".join(map(str, path)) for path, _ in units(net, params, example)]
    return [name for name in names if leaves_under(params, name)]


def block_diagonal(
    net: LayerProtocol,
    loss: Loss,
    params: Params,
    x: Array | None = None,
    targets: Array | None = None,
    *,
    curvature: str = "hessian",
    blocks: list[str] | tuple[str, ...] | None = None,
    batch_size: int | None = None,
    batches: Any = None,
    state: Any = None,
) -> StructuredOperator:
    """The exact Hessian's or GGN's diagonal blocks (one per layer, or the ``blocks`` named) as a
    :class:`StructuredOperator`, each block a dense matrix from the hand-derived products, one per column.

    Arguments:
        net, loss, params, x, targets, batch_size, batches, state: as :func:`mnet.spectrum.curvature_operator`.
        curvature: ``"hessian"`` or ``"ggn"``.
        blocks: None for one block per layer entry (attention's projections each apart); else the names of the
            blocks, each a leaf or a prefix of whole keys (``["0.W", "0.b", "2"]``), none overlapping.

    Returns:
        A :class:`StructuredOperator` over the blocks' parameters, block after block. Building a block of ``m``
        parameters costs ``m`` curvature products and ``m^2`` numbers: a tool for layers of thousands of
        parameters, not of millions (there the Kronecker operator serves).
    """
    check_data(x, targets, batches, "block_diagonal")
    if blocks is None:
        example = jnp.asarray(next(iter(check_batches(batches)()))[0] if x is None else x[:1])
        blocks = entry_names(net, params, example)
    if isinstance(blocks, str) or not blocks:
        raise SettingError(f"block_diagonal: blocks must be a non-empty list of names, got {blocks!r}")
    dense_blocks, indices = [], []
    for name in blocks:
        op = curvature_operator(
            net,
            loss,
            params,
            x,
            targets,
            curvature=curvature,
            block=name,
            batch_size=batch_size,
            batches=batches,
            state=state,
        )
        matrix = op.dense()
        values, vectors = jnp.linalg.eigh((matrix + matrix.T) / 2)
        dense_blocks.append(DenseBlock(values, vectors))
        indices.extend(leaves_under(params, name))
    if len(set(indices)) != len(indices):
        raise SettingError(f"block_diagonal: the blocks {list(blocks)} overlap; each parameter belongs to one")
    return structured(tuple(dense_blocks), tuple(blocks), flat_layout(params, indices), f"{curvature} block-diagonal")
