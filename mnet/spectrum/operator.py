"""The curvature as a linear operator on flat vectors: the Hessian or the GGN of the mean loss over a dataset, from
mnet's hand-derived products (:func:`mnet.hessian_vector_product`, :func:`mnet.ggn_vector_product`), for the
whole network or one block of its parameters. This is what the Krylov methods of :mod:`mnet.spectrum` act on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from mnet.core.chunks import split_batches
from mnet.core.protocol import Array, LayerProtocol, Params
from mnet.errors import SettingError
from mnet.losses import Loss
from mnet.quantities.ggn import ggn_vector_product
from mnet.quantities.hessian_vector import hessian_vector_product

CURVATURES = ("hessian", "ggn")


def leaf_name(path: tuple) -> str:
    """A leaf's name, its keys joined by dots (``0.W``, ``2.q.b``): the names checkpoints use."""
    return jax.tree_util.keystr(path, simple=True, separator=".")


def in_block(name: str, block: str | None) -> bool:
    """Whether the leaf ``name`` lies in ``block`` (a leaf's name or a prefix of whole keys; None for all)."""
    return block is None or name == block or name.startswith(block + ".")


@dataclass(frozen=True)
class CurvatureOperator:
    """``v -> C v`` for flat vectors ``v`` of the ``size`` parameters in ``names`` (the block's leaves, in tree
    order), ``C`` the chosen curvature's block. ``to_tree`` turns such a vector into a tree like the params, zero
    outside the block."""

    matvec: Callable[[Array], Array]
    size: int
    dtype: Any
    names: tuple[str, ...]
    to_tree: Callable[[Array], Params]
    curvature: str

    def dense(self) -> Array:
        """The ``(size, size)`` matrix, column by column (for small blocks and for checking)."""
        return jax.vmap(self.matvec)(jnp.eye(self.size, dtype=self.dtype)).T


def curvature_operator(
    net: LayerProtocol,
    loss: Loss,
    params: Params,
    x: Array,
    targets: Array,
    *,
    curvature: str = "hessian",
    block: str | None = None,
    batch_size: int | None = None,
    state: Any = None,
) -> CurvatureOperator:
    """The Hessian or GGN of the mean loss over ``(x, targets)`` as an operator on flat vectors.

    Arguments:
        net, loss, params: the network, its loss and the point.
        x, targets: the data; the curvature is the mean over all of it.
        curvature: ``"hessian"`` or ``"ggn"``.
        block: None for every parameter; else a leaf's name or a prefix of whole keys (``"0"`` for the first
            layer's entry, ``"0.W"`` for its matrix, ``"2.q"`` for an attention layer's query projection): the
            operator is then the curvature's diagonal block for those parameters.
        batch_size: the products run over chunks of this many examples (``lax.map``, so one compiled product),
            weighted by their sizes; None for the whole data at once.
        state: a BatchNorm's running statistics (evaluation mode), as the products take it.

    Returns:
        A :class:`CurvatureOperator`.
    """
    if curvature not in CURVATURES:
        raise SettingError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise SettingError(f"batch_size must be a positive int or None, got {batch_size!r}")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = tuple(leaf_name(path) for path, _ in leaves)
    chosen = [i for i, name in enumerate(names) if in_block(name, block)]
    if not chosen:
        raise SettingError(f"block {block!r} names no parameter; the parameters are {', '.join(names)}")
    arrays = [jnp.asarray(leaf) for _, leaf in leaves]
    shapes = [arrays[i].shape for i in chosen]
    sizes = [arrays[i].size for i in chosen]
    dtype = jnp.result_type(*(arrays[i].dtype for i in chosen))
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)

    def to_tree(v: Array) -> Params:
        tangent = [jnp.zeros_like(a) for a in arrays]
        for i, shape, start, stop in zip(chosen, shapes, offsets, offsets[1:]):
            tangent[i] = v[start:stop].reshape(shape).astype(arrays[i].dtype)
        return jax.tree_util.tree_unflatten(treedef, tangent)

    def to_flat(tree: Params) -> Array:
        parts = jax.tree_util.tree_leaves(tree)
        return jnp.concatenate([parts[i].reshape(-1).astype(dtype) for i in chosen])

    product: Callable[..., Params] = (hessian_vector_product if curvature == "hessian" else ggn_vector_product)(
        net, loss
    )
    (xs, ts), rest = split_batches((x, targets), batch_size)
    n = x.shape[0]

    def matvec(v: Array) -> Array:
        tangent = to_tree(v)

        def one(chunk: tuple) -> Array:
            return to_flat(product(params, chunk[0], chunk[1], tangent, state=state))

        total = jnp.sum(jax.lax.map(one, (xs, ts)), axis=0) * (xs.shape[1] / n)
        return total if rest is None else total + one(rest) * (rest[0].shape[0] / n)

    return CurvatureOperator(matvec, offsets[-1], dtype, tuple(names[i] for i in chosen), to_tree, curvature)
