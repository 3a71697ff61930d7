"""The curvature an influence score preconditions with, fitted once over the training data, and its damped inverse
applied to stacks of gradients: ``(C + damping I)^-1 g`` for ``C`` one of

* ``"identity"``: ``C = I`` (gradient similarity; TracIn at one checkpoint), so ``g / (1 + damping)``;
* ``"diag"``: the diagonal of the curvature (:func:`mnet.diag_ggn`'s walk);
* ``"kfac"``: each layer's ``kron(A, G)``, ``G`` counted per example as the layer's GGN block is
  (:class:`mnet.quantities.kronecker.GGNBlockFactors`), inverted in the factors' eigenbases;
* ``"ekfac"``: the same eigenbases with EK-FAC's corrected eigenvalues (:func:`mnet.quantities.ekfac.eigen_correction`);
* ``"ggn"``: the dense matrix, ``mean_n sum_c g_nc g_nc^T`` over every column's per-example gradient (the reference;
  small networks only).

The curvature's columns follow ``kind`` as everywhere in mnet: ``"kflr"`` the loss Hessian's exact square root (the
GGN), ``"kfac"`` one sample from the predictive distribution (the Fisher), ``"empirical"`` each example's gradient
at its label. Every fit is a mean over the whole training set, chunk by chunk, each chunk weighted by its size.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from mnet.core.chunks import chunks
from mnet.core.paths import flatten_with_keys
from mnet.core.protocol import Array, LayerProtocol, Params, call_forward
from mnet.core.walk import units, walk
from mnet.errors import LayerError, SettingError
from mnet.losses import Loss, with_mask
from mnet.quantities.ekfac import eigen_correction, eigenbases, eigenbasis_solve, is_basis_pair
from mnet.quantities.ggn import summed_diag_ggn
from mnet.quantities.kronecker import GGNBlockFactors, factor_columns, is_factor_pair, stack_bias, unstack_bias
from mnet.quantities.per_example import PER_EXAMPLE_BACKWARD

PRECONDITIONERS = ("identity", "diag", "kfac", "ekfac", "ggn")

#: The dense preconditioner's limit: a ``(n, n)`` matrix of this many parameters is about 0.8 GB in float64.
DENSE_LIMIT = 10_000


def on_one_device(arrays: tuple) -> tuple:
    """A chunk's arrays left where they are (no mesh)."""
    return arrays


def mean_over_chunks(
    fn: Callable[..., Any],
    x: Array,
    targets: Array,
    mask: Array | None,
    batch_size: int,
    key,
    place: Callable[[tuple], tuple] = on_one_device,
):
    """``sum_chunks (size / n) fn(x_chunk, targets_chunk, mask_chunk, key_chunk)``: a chunked mean of a tree of
    batch means (``mask_chunk`` None without a mask), each chunk's ``(x, targets, mask)`` put where ``place`` says
    (split over a mesh's devices, whose partial sums XLA then all-reduces)."""
    n, total = x.shape[0], None
    for index, part in enumerate(chunks(n, batch_size)):
        chunk_key = None if key is None else jax.random.fold_in(key, index)
        chunk = place((x[part], targets[part], None if mask is None else mask[part]))
        value = jax.tree_util.tree_map(lambda a, w=(part.stop - part.start) / n: a * w, fn(*chunk, chunk_key))
        total = value if total is None else jax.tree_util.tree_map(jnp.add, total, value)
    return total


def curvature_columns(net, loss, kind, params, x, targets, key, mask):
    """The forward cache and ``kind``'s columns at the outputs, the padding of ``mask`` left out (the loss masked,
    the network told which positions are tokens)."""
    masked_loss, targets = with_mask(loss, targets, mask)
    outputs, cache = call_forward(net, params, x, mask=mask)
    return cache, factor_columns(masked_loss, outputs, targets, kind, key, "influence")


@partial(jax.jit, static_argnums=(0, 1, 2))
def diagonal_chunk(net, loss, kind, params, x, targets, mask, key):
    cache, columns = curvature_columns(net, loss, kind, params, x, targets, key, mask)
    return jax.tree_util.tree_map(lambda d: d / x.shape[0], summed_diag_ggn(net, params, x, cache, columns, mask))


@partial(jax.jit, static_argnums=(0, 1, 2))
def factors_chunk(net, loss, kind, params, x, targets, mask, key):
    cache, columns = curvature_columns(net, loss, kind, params, x, targets, key, mask)
    quantity = GGNBlockFactors(kept=None if mask is None else jnp.asarray(mask))
    return walk(net, quantity, params, (cache,), (columns,))[0]


@partial(jax.jit, static_argnums=(0, 1, 2))
def correction_chunk(net, loss, kind, params, x, targets, mask, key, bases):
    return eigen_correction(net, loss, kind)(params, x, targets, bases, key=key, mask=mask)


@partial(jax.jit, static_argnums=(0, 1, 2))
def dense_chunk(net, loss, kind, params, x, targets, mask, key):
    """``mean_b sum_c vec(g_bc) vec(g_bc)^T`` for the chunk, every column's per-example gradient built."""
    cache, columns = curvature_columns(net, loss, kind, params, x, targets, key, mask)
    grads = jax.vmap(lambda column: PER_EXAMPLE_BACKWARD.run(net, params, cache, column)[0])(columns)
    flat = jnp.concatenate([g.reshape(g.shape[0] * g.shape[1], -1) for g in jax.tree_util.tree_leaves(grads)], axis=1)
    return flat.T @ flat / x.shape[0]


def flat_size(params: Params) -> int:
    return sum(jnp.size(leaf) for leaf in jax.tree_util.tree_leaves(params))


def kfac_blocks(factors: Any) -> Any:
    """K-FAC's factors as eigenbases with the eigenvalues' products, ``{"QA", "QG", "S"}`` per entry."""

    def block(pair: Any) -> Any:
        if not is_factor_pair(pair):
            return pair
        a, QA = jnp.linalg.eigh(pair["A"])
        g, QG = jnp.linalg.eigh(pair["G"])
        return {"QA": QA, "QG": QG, "S": jnp.outer(jnp.maximum(a, 0), jnp.maximum(g, 0))}

    return jax.tree_util.tree_map(block, factors, is_leaf=is_basis_pair)


def ekfac_blocks(bases: Any, corrected: Any) -> Any:
    def block(basis: Any, S: Any) -> Any:
        return {"QA": basis["A"], "QG": basis["G"], "S": S} if is_factor_pair(basis) and S is not None else None

    return jax.tree_util.tree_map(
        lambda b, s: block(b, s) if is_factor_pair(b) else b, bases, corrected, is_leaf=is_basis_pair
    )


def missing_blocks(net: LayerProtocol, params: Params, x: Array, blocks: Any) -> list[tuple[Any, str]]:
    """``[(layer, "params[...]")]``: the entries with parameters but no Kronecker block, with the unit they belong
    to (the layer whose entry holds them) and their place in the params."""
    holes = [keys for keys, node in flatten_with_keys(blocks, is_leaf=lambda n: n is None) if node is None]
    found = units(net, params, jax.ShapeDtypeStruct(x.shape, x.dtype))
    named = []
    for keys in holes:
        layer = next((lay for path, lay in found if keys[: len(path)] == path or path[: len(keys)] == keys), None)
        named.append((layer, "params" + "".join(f"[{k!r}]" for k in keys)))
    return named


@dataclass(frozen=True)
class Preconditioner:
    """A fitted curvature: ``solve(g)`` is ``(C + damping I)^-1 g`` for a tree ``g`` like the params with one
    leading axis (a stack of gradients). ``mean_eigenvalue`` is the curvature's mean eigenvalue (``trace / size``),
    from which the default damping is set."""

    name: str
    damping: float
    diagonal: Any = None
    blocks: Any = None
    dense: Array | None = None

    def solve(self, grads: Params) -> Params:
        if self.name == "identity":
            return jax.tree_util.tree_map(lambda g: g / (1 + self.damping), grads)
        if self.name == "ggn":
            leaves, treedef = jax.tree_util.tree_flatten(grads)
            flat = jnp.concatenate([g.reshape(g.shape[0], -1) for g in leaves], axis=1)
            dense = jnp.asarray(self.dense)
            damped = dense + self.damping * jnp.eye(dense.shape[0], dtype=dense.dtype)
            solved = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(damped), flat.T).T
            bounds = list(itertools.accumulate(g[0].size for g in leaves))[:-1]
            parts = jnp.split(solved, bounds, axis=1)
            return jax.tree_util.tree_unflatten(treedef, [p.reshape(g.shape) for p, g in zip(parts, leaves)])
        if self.name == "diag":
            return jax.tree_util.tree_map(lambda g, d: g / (d + self.damping), grads, self.diagonal)
        return solve_blocks(self.blocks, grads, self.diagonal, self.damping)

    def mean_eigenvalue(self) -> float:
        return mean_eigenvalue(self)


def solve_blocks(blocks: Any, grads: Params, diagonal: Any, damping: float) -> Params:
    """Each Kronecker entry's ``[W; b]`` solved in its eigenbasis, ``Q_A ((Q_A^T M Q_G) / (S + damping)) Q_G^T``;
    an entry without a block divided by the diagonal (the fallback) where one was fitted."""
    if isinstance(blocks, dict) and set(blocks) == {"QA", "QG", "S"}:
        return unstack_bias(
            eigenbasis_solve(blocks["QA"], blocks["QG"], blocks["S"], stack_bias(grads), damping), grads
        )
    if blocks is None:
        return jax.tree_util.tree_map(lambda g, d: g / (d + damping), grads, diagonal)
    if blocks == ():
        return grads
    if isinstance(blocks, dict):
        return {name: solve_blocks(blocks[name], grads[name], part(diagonal, name), damping) for name in grads}
    return type(grads)(
        solve_blocks(b, g, part(diagonal, index), damping) for index, (b, g) in enumerate(zip(blocks, grads))
    )


def part(tree: Any, key: Any) -> Any:
    """``tree[key]``, None staying None (no diagonal was fitted)."""
    return None if tree is None else tree[key]


def is_eigen_entry(node: Any) -> bool:
    return isinstance(node, dict) and set(node) == {"QA", "QG", "S"}


def block_trace(blocks: Any, diagonal: Any) -> tuple[float, int]:
    """``(trace, size)`` of the Kronecker entries' blocks and, where an entry has none, of the diagonal fallback."""
    if is_eigen_entry(blocks):
        return float(jnp.sum(blocks["S"])), blocks["S"].size
    if blocks is None:
        leaves = jax.tree_util.tree_leaves(diagonal)
        return float(sum(jnp.sum(d) for d in leaves)), sum(d.size for d in leaves)
    if blocks == ():
        return 0.0, 0
    keys = list(blocks) if isinstance(blocks, dict) else range(len(blocks))
    traces = [block_trace(blocks[key], part(diagonal, key)) for key in keys]
    return sum(t for t, _ in traces), sum(n for _, n in traces)


def mean_eigenvalue(preconditioner: Preconditioner) -> float:
    name = preconditioner.name
    if name == "identity":
        return 1.0
    if name == "ggn":
        dense = jnp.asarray(preconditioner.dense)
        return float(jnp.trace(dense) / dense.shape[0])
    if name == "diag":
        leaves = jax.tree_util.tree_leaves(preconditioner.diagonal)
        return float(sum(jnp.sum(d) for d in leaves) / sum(d.size for d in leaves))
    trace, size = block_trace(preconditioner.blocks, preconditioner.diagonal)
    return trace / max(size, 1)


def fit_preconditioner(
    net: LayerProtocol,
    loss: Loss,
    params: Params,
    x: Array,
    targets: Array,
    *,
    name: str,
    kind: str,
    damping: float | None,
    batch_size: int,
    key: Array | None,
    fallback: str | None,
    mask: Array | None = None,
    place: Callable[[tuple], tuple] = on_one_device,
) -> Preconditioner:
    """Fit ``name``'s curvature over ``(x, targets)`` (means over chunks of ``batch_size``, each chunk put where
    ``place`` says) and damp it: by ``damping``, or by ``0.1`` times the curvature's mean eigenvalue when
    ``damping`` is None (Kronfluence's heuristic, over the whole network)."""
    if kind == "kfac" and key is None and name != "identity":
        raise SettingError('influence(kind="kfac") samples the curvature\'s columns: pass key=...')

    def fitted(chunk_fn: Callable, *extra: Any) -> Any:
        return mean_over_chunks(
            lambda xs, ts, ms, k: chunk_fn(net, loss, kind, params, xs, ts, ms, k, *extra),
            x,
            targets,
            mask,
            batch_size,
            key,
            place,
        )

    diagonal = blocks = dense = None
    if name == "diag":
        diagonal = fitted(diagonal_chunk)
    elif name == "ggn":
        size = flat_size(params)
        if size > DENSE_LIMIT:
            raise SettingError(
                f'influence(preconditioner="ggn") builds the dense {size} x {size} curvature; it is for networks of at '
                f'most {DENSE_LIMIT} parameters: use "ekfac", "kfac" or "diag"'
            )
        dense = fitted(dense_chunk)
    elif name in ("kfac", "ekfac"):
        factors = fitted(factors_chunk)
        if name == "kfac":
            blocks = kfac_blocks(factors)
        else:
            bases = eigenbases(factors)
            blocks = ekfac_blocks(bases, fitted(correction_chunk, bases))
        holes = missing_blocks(net, params, x, blocks)
        if holes and fallback is None:
            layer, where = holes[0]
            others = "" if len(holes) == 1 else f" (and {len(holes) - 1} more entries)"
            raise LayerError(
                layer if layer is not None else where,
                f'at {where} has parameters but no Kronecker structure, so preconditioner="{name}" cannot cover it'
                f'{others}: pass fallback="diag" to precondition such layers by the curvature\'s diagonal',
            )
        if holes:
            diagonal = fitted(diagonal_chunk)
    preconditioner = Preconditioner(name, 1.0 if damping is None else damping, diagonal, blocks, dense)
    if damping is None:
        preconditioner = Preconditioner(name, 0.1 * preconditioner.mean_eigenvalue(), diagonal, blocks, dense)
    return preconditioner
