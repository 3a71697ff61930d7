"""The curvature as a linear operator on flat vectors: the Hessian or the GGN of the mean loss over a dataset, from
mnet's hand-derived products (:func:`mnet.hessian_vector_product`, :func:`mnet.ggn_vector_product`), for the
whole network or one block of its parameters. This is what the Krylov methods of :mod:`mnet.spectrum` act on.

The data come as arrays (cut into equal chunks for one compiled ``lax.map``) or as batches, any re-iterable of
``(x, targets)`` or ``(x, targets, mask)`` (a list, or a function returning a fresh iterator, as a data loader):
each product then runs over every batch in turn, weighted by its number of examples, so the operator is the
curvature of the mean loss over the whole dataset while one batch at a time is in memory (curvlinops' data
loaders)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
    outside the block. ``operator @ v`` takes a vector ``(size,)`` or a matrix of vectors ``(size, k)``."""

    matvec: Callable[[Array], Array]
    size: int
    dtype: Any
    names: tuple[str, ...]
    to_tree: Callable[[Array], Params]
    curvature: str

    def matmat(self, V: Array) -> Array:
        """``C V`` for ``V`` of shape ``(size, k)``: the ``k`` products vectorised (one compiled product)."""
        return jax.vmap(self.matvec, in_axes=1, out_axes=1)(V)

    def __matmul__(self, v: Array) -> Array:
        v = jnp.asarray(v)
        if v.ndim not in (1, 2) or v.shape[0] != self.size:
            raise SettingError(
                f"the {self.curvature} operator acts on vectors of {self.size} parameters, (size,) or (size, k); got "
                f"an array of shape {v.shape}"
            )
        return self.matvec(v) if v.ndim == 1 else self.matmat(v)

    def dense(self) -> Array:
        """The ``(size, size)`` matrix, column by column, 256 products at a time (for small blocks and for
        checking)."""
        return jax.lax.map(self.matvec, jnp.eye(self.size, dtype=self.dtype), batch_size=min(self.size, 256)).T


@dataclass(frozen=True)
class FlatLayout:
    """Some leaves of a params tree (``chosen``, indices into its leaves) as one flat vector, in the given order."""

    arrays: tuple[Array, ...]
    treedef: Any
    chosen: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def size(self) -> int:
        return sum(self.arrays[i].size for i in self.chosen)

    @property
    def dtype(self) -> Any:
        return jnp.result_type(*(self.arrays[i].dtype for i in self.chosen))

    def to_tree(self, v: Array) -> Params:
        """A flat vector as a tree like the params, zero outside the chosen leaves."""
        tangent = [jnp.zeros_like(a) for a in self.arrays]
        start = 0
        for i in self.chosen:
            tangent[i] = (
                v[start : start + self.arrays[i].size].reshape(self.arrays[i].shape).astype(self.arrays[i].dtype)
            )
            start += self.arrays[i].size
        return jax.tree_util.tree_unflatten(self.treedef, tangent)

    def to_flat(self, tree: Params) -> Array:
        """The chosen leaves of a tree like the params, as one flat vector."""
        parts = jax.tree_util.tree_leaves(tree)
        return jnp.concatenate([parts[i].reshape(-1).astype(self.dtype) for i in self.chosen])


def flat_layout(
    params: Params, chosen: Callable[[str], bool] | list[int] | None = None, refusal: str = "no parameter is chosen"
) -> FlatLayout:
    """The layout of the leaves of ``params`` that ``chosen`` picks (a test of a leaf's name, or leaf indices in the
    order wanted; None for all); refused with ``refusal`` and the parameters' names when it picks none."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = tuple(leaf_name(path) for path, _ in leaves)
    if chosen is None or callable(chosen):
        picked = [i for i, name in enumerate(names) if chosen is None or chosen(name)]
    else:
        picked = list(chosen)
    if not picked:
        raise SettingError(f"{refusal}; the parameters are {', '.join(names)}")
    arrays = tuple(jnp.asarray(leaf) for _, leaf in leaves)
    return FlatLayout(arrays, treedef, tuple(picked), tuple(names[i] for i in picked))


def check_batches(batches: Any) -> Callable[[], Iterable]:
    """``batches`` as a function returning a fresh iterable of batches; a one-shot iterator is refused, since every
    product runs over the data again."""
    if callable(batches):
        return batches
    if not isinstance(batches, Iterable) or iter(batches) is batches:
        raise SettingError(
            "batches must be re-iterable: a list or tuple of (x, targets[, mask]) batches, or a function returning a "
            f"fresh iterator of them (every product runs over the data again); got {type(batches).__name__}"
        )
    return lambda: batches


def read_batches(batches: Any) -> tuple[Callable[[], Iterable], int, int]:
    """The checked batches, their total number of examples and their number (one pass over them)."""
    fresh = check_batches(batches)
    total, count = 0, 0
    for i, batch in enumerate(fresh()):
        if not isinstance(batch, tuple | list) or len(batch) not in (2, 3):
            raise SettingError(
                f"batch {i} must be a tuple (x, targets) or (x, targets, mask), got {type(batch).__name__}"
            )
        total, count = total + jnp.shape(batch[0])[0], count + 1
    if total == 0:
        raise SettingError("batches holds no example")
    return fresh, total, count


def check_data(x: Any, targets: Any, batches: Any, where: str) -> None:
    """Exactly one source of data: ``x`` with ``targets``, or ``batches``."""
    if batches is None and (x is None or targets is None):
        raise SettingError(f"{where}: pass the data as x and targets, or as batches=")
    if batches is not None and (x is not None or targets is not None):
        raise SettingError(f"{where}: pass the data as x and targets or as batches=, not both")


def curvature_operator(
    net: LayerProtocol,
    loss: Loss,
    params: Params,
    x: Array | None = None,
    targets: Array | None = None,
    *,
    curvature: str = "hessian",
    block: str | None = None,
    batch_size: int | None = None,
    batches: Any = None,
    state: Any = None,
) -> CurvatureOperator:
    """The Hessian or GGN of the mean loss over ``(x, targets)`` (or over ``batches``) as an operator on flat vectors.

    Arguments:
        net, loss, params: the network, its loss and the point.
        x, targets: the data; the curvature is the mean over all of it.
        curvature: ``"hessian"`` or ``"ggn"``.
        block: None for every parameter; else a leaf's name or a prefix of whole keys (``"0"`` for the first
            layer's entry, ``"0.W"`` for its matrix, ``"2.q"`` for an attention layer's query projection): the
            operator is then the curvature's diagonal block for those parameters.
        batch_size: the products run over chunks of this many examples (``lax.map``, so one compiled product),
            weighted by their sizes; None for the whole data at once.
        batches: instead of ``x`` and ``targets``, a re-iterable of ``(x, targets)`` or ``(x, targets, mask)``
            batches, or a function returning a fresh iterator of them: every product runs over all of them in
            turn, each weighted by its number of examples.
        state: a BatchNorm's running statistics (evaluation mode), as the products take it.

    Returns:
        A :class:`CurvatureOperator`.
    """
    if curvature not in CURVATURES:
        raise SettingError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise SettingError(f"batch_size must be a positive int or None, got {batch_size!r}")
    check_data(x, targets, batches, "curvature_operator")
    layout = flat_layout(params, lambda name: in_block(name, block), f"block {block!r} names no parameter")
    product: Callable[..., Params] = (hessian_vector_product if curvature == "hessian" else ggn_vector_product)(
        net, loss
    )
    if batches is not None:
        matvec = over_batches(product, params, layout, batches, state)
    else:
        matvec = over_chunks(product, params, layout, x, targets, batch_size, state)
    return CurvatureOperator(matvec, layout.size, layout.dtype, layout.names, layout.to_tree, curvature)


def over_chunks(product, params, layout, x, targets, batch_size, state) -> Callable[[Array], Array]:
    """The product over ``(x, targets)`` in equal chunks (one ``lax.map``) and the rows left over."""
    (xs, ts), rest = split_batches((x, targets), batch_size)
    n = x.shape[0]

    def matvec(v: Array) -> Array:
        tangent = layout.to_tree(v)

        def one(chunk: tuple) -> Array:
            return layout.to_flat(product(params, chunk[0], chunk[1], tangent, state=state))

        total = jnp.sum(jax.lax.map(one, (xs, ts)), axis=0) * (xs.shape[1] / n)
        return total if rest is None else total + one(rest) * (rest[0].shape[0] / n)

    return matvec


def over_batches(product, params, layout, batches, state) -> Callable[[Array], Array]:
    """The product over every batch in turn (one compiled product per batch shape), weighted by its size."""
    fresh, n, _ = read_batches(batches)

    @jax.jit
    def one(v: Array, x: Array, targets: Array, mask: Array | None) -> Array:
        return layout.to_flat(product(params, x, targets, layout.to_tree(v), state=state, mask=mask))

    def matvec(v: Array) -> Array:
        total = jnp.zeros((layout.size,), layout.dtype)
        for batch in fresh():
            x, targets, mask = (*batch, None)[:3]
            total = total + one(v, jnp.asarray(x), jnp.asarray(targets), mask) * (jnp.shape(x)[0] / n)
        return total

    return matvec
