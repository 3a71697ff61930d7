"""What the Hessian-diagonal walk carries down (signed columns and a diagonal), and the helpers layers write their
second-order rules with; the quantity and its driver are :mod:`mnet.quantities.diag_hessian`.

Derivation. Take one example and a layer ``y = f(x)`` inside the network; write ``g = dl/dy`` for the gradient of
the example's loss reaching ``y`` and ``H_y`` for the Hessian of the loss with respect to ``y``. The chain rule
twice gives the Hessian at the layer's input,

    H_x = J^T H_y J + sum_m g_m d^2 y_m / dx^2          (J = dy/dx),

the first term the Gauss-Newton part carried back, the second the layer's own curvature. For a dense layer
``z = x W + b`` the second term vanishes (``z`` is linear in ``x``), and since ``z`` is linear in ``W`` as well,
the Hessian of the loss with respect to ``W_ij`` is ``sum_b x_bi^2 (H_z_b)_jj``; with positions (windows,
sequences) ``sum_b sum_st x_bsi x_bti (H_z_b)_(sj),(tj)``. So every dense layer needs the Hessian at its output.
An elementwise activation ``a = phi(z)`` has ``J = diag(phi'(z))`` and adds the diagonal ``diag(phi''(z) g)``.

Representation. ``H_y`` is carried, example by example, as signed columns plus a diagonal,

    H_y[b] = sum_k s[k, b] c[k, b] c[k, b]^T + diag(d[b])

(:class:`Curvature`). The loss's Hessian square root starts the columns (signs +1, :mod:`mnet.quantities.diag_hessian`); an
activation scales every column by ``phi'`` and its diagonal by ``phi'^2``, and adds ``phi'' g`` to the diagonal,
which therefore stays a vector however many activations follow one another. A dense layer reads its share from
both parts (the diagonal part costs one product, ``(x^2)^T d``), then turns the diagonal into columns for its
input, ``sqrt|d_j| W[:, j]`` with the sign of ``d_j``: a broadcast, not a product. So a column set grows only where
curvature enters (one column per unit of an activation with ``phi'' != 0``), and a chain ``Dense, tanh, Dense``
pays no product for the activation's curvature at all. This is BackPACK's scheme (Dangel et al. 2020: the
residual's positive and negative parts as separate square roots) with the diagonal kept unexpanded until a
non-elementwise layer needs it.

Where two paths meet (a residual's skip and block; a parallel's summed blocks) the same ``H_y`` reaches the input
along both, and the cross terms must not be lost: before the fork the diagonal is made into columns, and the
paths' columns that share an origin (a group id) are summed, not concatenated (:meth:`Curvature.join`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp

from mnet.core.protocol import Array
from mnet.core.sums import add_cotangents, sum_stack
from mnet.errors import LayerError

_origins = itertools.count()


def next_origin() -> int:
    """A fresh identity for a column set (read at trace time, so static under ``jit``)."""
    return next(_origins)


@dataclass(frozen=True)
class Columns:
    """``sum_k signs[k, b] columns[k, b] columns[k, b]^T`` per example: ``columns`` ``(k, batch, *shape)``, ``signs``
    ``(k, batch)`` or None for all +1. ``origin`` identifies where the columns entered the walk, so that copies
    of them that come back along two paths add up as one set."""

    origin: int
    columns: Array
    signs: Array | None = None

    def squares(self, per_column: Array) -> Array:
        """``sum_k signs[k] per_column[k]``, for per-column squares ``(k, batch, ...)`` -> ``(batch, ...)``."""
        return sum_stack(per_column, self.signs)

    def diagonal(self) -> Array:
        """``(batch, *shape)``: the diagonal of this set's term."""
        return self.squares(self.columns**2)

    def materialized(self) -> Columns:
        return self

    def scaled(self, linear: Callable[[Array], Array]) -> Columns:
        return replace(self, columns=jax.vmap(linear)(self.columns))


@dataclass(frozen=True)
class WeightedRows:
    """A dense layer's diagonal part ``diag(d)`` carried to its input, kept factored: ``W diag(d) W^T`` with each
    example's rows then scaled by ``scale`` (the ``phi'`` of the activations passed since), that is the columns
    ``scale_b * sqrt|d_bj| W[:, j]`` with signs ``sign(d_bj)``. Its diagonal is ``scale^2 (d (W * W)^T)``, one
    product; the columns are built only when a layer other than an elementwise one needs them."""

    origin: int
    W: Array
    d: Array
    scale: Array | None = None

    def diagonal(self) -> Array:
        diagonal = self.d @ (self.W * self.W).T.astype(self.d.dtype)
        return diagonal if self.scale is None else self.scale**2 * diagonal

    def materialized(self) -> Columns:
        columns = jnp.einsum("bj,ij->jbi", jnp.sqrt(jnp.abs(self.d)), self.W.astype(self.d.dtype))
        if self.scale is not None:
            columns = columns * self.scale[None]
        return Columns(self.origin, columns, jnp.sign(self.d).T)

    def scaled(self, linear: Callable[[Array], Array]) -> WeightedRows:
        """Through an elementwise map (``linear(v) = m * v``): the scale becomes ``m * scale``."""
        ones = jnp.ones((self.d.shape[0], self.W.shape[0]), self.d.dtype)
        return replace(self, scale=linear(ones if self.scale is None else self.scale))


Group = Columns | WeightedRows


@dataclass(frozen=True)
class Curvature:
    """What the diagonal-Hessian walk carries: the per-example loss gradient ``grad`` ``(batch, *shape)`` at this
    point, the signed column sets, and the diagonal ``diag`` (``(batch, *shape)``, or None for zero)."""

    grad: Array
    groups: tuple[Group, ...]
    diag: Array | None = None

    @classmethod
    def start(cls, grad: Array, square_root: Array) -> Curvature:
        """At the network's output: the loss's gradient and the columns of its Hessian's square root."""
        return cls(grad, (Columns(next_origin(), square_root),))

    def columns(self) -> tuple[Columns, ...]:
        """Every column set as columns (the factored ones built)."""
        return tuple(group.materialized() for group in self.groups)

    def expanded(self) -> Curvature:
        """All columns: the factored sets built, and the diagonal made into one more set,
        ``diag(d) = sum_j sign(d_j) (sqrt|d_j| e_j)(...)^T``."""
        groups = self.columns()
        if self.diag is None:
            return Curvature(self.grad, groups)
        batch, shape = self.diag.shape[0], self.diag.shape[1:]
        flat = self.diag.reshape(batch, -1)
        units = flat.shape[1]
        columns = jnp.einsum("bj,jk->jbk", jnp.sqrt(jnp.abs(flat)), jnp.eye(units, dtype=flat.dtype))
        group = Columns(next_origin(), columns.reshape((units, batch) + shape), jnp.sign(flat).T)
        return Curvature(self.grad, groups + (group,))

    def through(self, linear: Callable[[Array], Array], diagonal: Callable[[Array], Array] | None = None) -> Curvature:
        """Back through a map whose second derivative is zero: ``linear`` is its backward on one ``(batch, ...)``
        cotangent. ``diagonal`` maps a diagonal ``d`` at the output to ``J^T diag(d) J``'s diagonal when the map
        is elementwise (``linear(v) = m * v``, ``diagonal(d) = m^2 * d``): the diagonal and the factored sets then
        stay as they are, scaled. Without it, everything is expanded into columns first."""
        if diagonal is None:
            source = self.expanded()
            return Curvature(linear(source.grad), tuple(group.scaled(linear) for group in source.groups))
        diag = None if self.diag is None else diagonal(self.diag)
        return Curvature(linear(self.grad), tuple(group.scaled(linear) for group in self.groups), diag)

    def reshaped(self, rearrange: Callable[[Array], Array]) -> Curvature:
        """Through a map that only moves each example's entries: columns and diagonal moved alike."""
        groups = tuple(group.scaled(rearrange) for group in self.columns())
        return Curvature(rearrange(self.grad), groups, None if self.diag is None else rearrange(self.diag))

    def times(self, v: Array) -> Array:
        """``H_y v`` example by example, for ``v`` shaped like ``grad``: each set's ``sum_k s_k c_k (c_k . v)`` plus
        ``d * v``."""
        total = jnp.zeros_like(v) if self.diag is None else self.diag * v
        for group in self.columns():
            weights = jnp.sum(group.columns * v[None], axis=tuple(range(2, group.columns.ndim)))
            if group.signs is not None:
                weights = weights * group.signs
            total = total + jnp.einsum("kb,kb...->b...", weights, group.columns)
        return total

    def plus_diagonal(self, extra: Array | None) -> Curvature:
        if extra is None:
            return self
        return replace(self, diag=extra if self.diag is None else self.diag + extra)

    def split(self, bounds: list[int]) -> list[Curvature]:
        """The parts for a concatenation's pieces along the last axis (the Hessian of a piece is its block)."""

        def pieces(a: Array) -> list[Array]:
            return jnp.split(a, bounds, axis=-1)

        groups = self.columns()
        grads = pieces(self.grad)
        diags = pieces(self.diag) if self.diag is not None else [None] * len(grads)
        columns = [pieces(group.columns) for group in groups]
        return [
            Curvature(grad, tuple(replace(group, columns=c[i]) for group, c in zip(groups, columns)), diag)
            for i, (grad, diag) in enumerate(zip(grads, diags))
        ]

    def join(self, other: Curvature) -> Curvature:
        """The Hessian at an input reached along two paths: gradients add, column sets of one origin add (the same
        columns carried along both paths), the others are kept side by side, diagonals add."""
        groups: dict[int, Group] = {group.origin: group for group in self.groups}
        for group in other.groups:
            mine = groups.get(group.origin)
            if mine is None:
                groups[group.origin] = group
            else:
                mine, theirs = mine.materialized(), group.materialized()
                groups[group.origin] = replace(mine, columns=mine.columns + theirs.columns)
        if self.diag is None or other.diag is None:
            diag = self.diag if other.diag is None else other.diag
        else:
            diag = self.diag + other.diag
        return Curvature(add_cotangents(self.grad, other.grad), tuple(groups.values()), diag)


def position_columns(terms: list[tuple[Array, Array | float, Array | float]]) -> Columns:
    """A positionwise layer's own curvature as signed columns: at every position (each index of the axes before the
    last) a sum of rank-one terms ``sign * weight * v v^T`` over the last axis. ``terms`` holds
    ``(v, weight, sign)``, ``v`` shaped like the layer's input ``(batch, ..., d)``, ``weight >= 0`` and ``sign``
    broadcastable to ``(batch, ..., 1)``. Column ``q`` of a term is ``sqrt(weight) v`` at position ``q`` and 0
    elsewhere: ``len(terms)`` columns per position, each the size of an example."""
    shape = terms[0][0].shape
    batch, width = shape[0], shape[-1]
    positions = math.prod(shape[1:-1])
    eye = jnp.eye(positions, dtype=terms[0][0].dtype)
    columns, signs = [], []
    for vector, weight, sign in terms:
        scaled = (jnp.sqrt(weight) * vector).reshape(batch, positions, width)
        columns.append(jnp.einsum("bpj,pq->qbpj", scaled, eye).reshape((positions,) + shape))
        signs.append(jnp.broadcast_to(sign, shape[:-1] + (1,)).reshape(batch, positions).T)
    return Columns(next_origin(), jnp.concatenate(columns), jnp.concatenate(signs))


def no_rule(layer: Any) -> LayerError:
    return LayerError(
        layer,
        "has no second-order rule, so diag_hessian cannot pass through it: give it a diag_hessian(params, cache, "
        "curvature) method, or curvature_free = True if its output is linear (or piecewise linear) in its input and "
        "in each parameter",
    )


def signed_square_sum(groups: tuple[Columns, ...], per_column_squares: Callable[[Array], Any]) -> Any:
    """``sum`` over every column set of ``signs * per_column_squares(columns)`` (trees summed leaf by leaf)."""
    total = None
    for group in groups:
        part = jax.tree_util.tree_map(group.squares, per_column_squares(group.columns))
        total = part if total is None else jax.tree_util.tree_map(jnp.add, total, part)
    return total
