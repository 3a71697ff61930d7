"""The exact Hessian diagonal: the quantity that carries a :class:`mnet.core.curvature.Curvature` down the
network, the default rule of a layer without structure of its own, and the driver.

The derivation and the representation of what is carried are in :mod:`mnet.core.curvature`, beside the helpers the
layers' own ``diag_hessian`` rules use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import jax
import jax.numpy as jnp

from mnet.core.curvature import Columns, Curvature, next_origin, no_rule, signed_square_sum
from mnet.core.protocol import Array, LayerProtocol, Params, call_forward, has_params
from mnet.core.sums import sum_stack
from mnet.core.tangent import tangent_walk
from mnet.core.walk import Quantity, own_rule, walk
from mnet.errors import SettingError
from mnet.losses import Loss, with_mask
from mnet.quantities.hessian_vector import hessian_vector_product
from mnet.quantities.per_example import per_example_stack


class DiagHessian(Quantity):
    """The Hessian diagonal summed over the batch (the driver divides by it). Carries a :class:`Curvature`. A
    unit's rule is ``diag_hessian(params, cache, curvature) -> (share like params, curvature at the input)``;
    the default serves a layer that declares ``curvature_free = True`` (zero second derivative in its input and in
    each parameter: linear maps, pools, ReLU-like masks): columns through ``backward``, the share from the
    per-example gradient of every column. Any other layer without a rule is refused by name."""

    rule = "diag_hessian"

    def tie_at(self, layer, params, caches, carried, first, second):
        cross = tied_cross_diagonal(layer, params, caches[0], carried[0])
        return {"W": first["W"] + second["W"] + 2 * cross}

    def at_unit(self, layer, params, caches, carried):
        own = own_rule(layer, self.rule)
        if own is not None:
            share, curvature = own(params, caches[0], carried[0])
            return share, (curvature,)
        if not getattr(layer, "curvature_free", False):
            if has_params(params) or own_rule(layer, "backward_tangent") is None:
                raise no_rule(layer)
            return (), (from_hessian_vector_rule(layer, caches[0], carried[0]),)
        cache, curvature = caches[0], carried[0].expanded()
        below = curvature.through(lambda dy: layer.backward(params, cache, dy)[1])
        if not has_params(params):
            return (), (below,)

        def squares(columns: Array) -> Params:
            per_example = per_example_stack(layer, params, cache, columns)
            return jax.tree_util.tree_map(lambda g: g * g, per_example)

        share = signed_square_sum(curvature.groups, squares)
        return jax.tree_util.tree_map(sum_stack, share), (below,)

    def fork(self, value):
        return value.expanded()

    def split(self, value, bounds):
        return value.split(bounds)

    def join(self, a, b):
        return a.join(b)


DIAG_HESSIAN = DiagHessian()


def from_hessian_vector_rule(layer: Any, cache: Any, curvature: Curvature) -> Curvature:
    """The curvature at the input of a parameterless layer that has a Hessian-vector rule but no second-order rule
    of its own (the attention cores, a user's layer): ``J^T H_y J`` through ``backward``, plus the layer's own
    curvature ``M = sum_m g_m d^2 y_m / dx^2`` (``g`` the gradient reaching ``y``), built column by column from
    ``backward_tangent``: along the tangent ``e_i`` with ``dy = g`` and ``R{dy} = 0`` its ``R{dx}`` is ``M e_i =
    m_i``. Since ``M = 1/2 sum_i (e_i m_i^T + m_i e_i^T)`` and ``e m^T + m e^T = 1/2 ((a e + m/a)(...)^T -
    (a e - m/a)(...)^T)`` for any ``a > 0``, ``M`` is ``2n`` signed columns ``(a_i e_i +- m_i / a_i) / 2`` with
    ``a_i = sqrt(|m_i|)`` (which keeps both halves of a column at one scale, so nothing cancels). Exact; the cost
    is ``n`` Hessian-vector passes through the layer and ``2n`` columns of size ``n`` per example, ``n`` the size of
    one example's input (for attention over ``T`` positions, ``n = 3 T heads d``, so ``O(T^2)`` columns' worth)."""
    below = curvature.through(lambda dy: layer.backward((), cache, dy)[1])
    shape = below.grad.shape
    batch, n = shape[0], math.prod(shape[1:])
    basis = jnp.broadcast_to(jnp.eye(n, dtype=below.grad.dtype)[:, None, :], (n, batch, n)).reshape((n,) + shape)
    no_dy = jnp.zeros_like(curvature.grad)

    def column(e: Array) -> Array:
        return layer.backward_tangent((), cache, ((), e), curvature.grad, no_dy)[2]

    rows = jax.vmap(column)(basis).reshape(n, batch, n)
    norms = jnp.sqrt(jnp.linalg.norm(rows, axis=-1, keepdims=True))
    a = jnp.where(norms > 0, norms, 1)
    unit = jnp.eye(n, dtype=rows.dtype)[:, None, :] * a
    columns = jnp.concatenate([unit + rows / a, unit - rows / a]) / 2
    signs = jnp.concatenate([jnp.ones((n, batch), rows.dtype), -jnp.ones((n, batch), rows.dtype)])
    own = Columns(next_origin(), columns.reshape((2 * n,) + shape), signs)
    return replace(below, groups=below.groups + (own,))


def tied_cross_diagonal(layer: Any, params: Params, cache: Any, curvature: Curvature) -> Array:
    """The diagonal of the mixed block ``d^2 L / dE_lookup dE_readout`` of a table used twice
    (:class:`mnet.layers.tied.Tied`, ``z = body(E[ids]) E^T``), summed over the batch: the walk's two shares are
    the diagonals of the two uses' own blocks, so the table's diagonal is ``lookup + readout + 2 cross``.

    The read-out's gradient is ``dL/dE_r[v, j] = sum_t g[t, v] h[t, j]`` (``g = dl/dz``, ``h`` the body's output).
    Moving the lookup along a direction ``u`` moves ``h`` by ``dh = J_body u`` and ``z`` by ``dz = dh E^T``, so
    ``g`` by ``H_z dz``; the derivative of the read-out's gradient is ``sum_t (H_z dz)[t, v] h[t, j] + g[t, v]
    dh[t, j]``. The direction ``E_l[v, j]`` is ``e_j`` at every position ``s`` with ``ids[s] = v``, and the
    derivative is linear in it: so ``cross[v, j] = sum_b sum_{s: ids[b, s] = v} c[b, s, j]``, with ``c[b, s, j]``
    the derivative above at ``v = ids[b, s]`` along ``e_j`` at position ``s`` alone. Exact; the cost is one
    hand-derived tangent pass through the body per (position, feature), ``T d`` passes of the whole batch at once
    (independent of the vocabulary), each with one product by the loss Hessian's columns."""
    ids, body_cache, h = layer.uses(cache)
    table = params["embedding"]["W"]
    vocab, width = table.shape
    batch, positions = ids.shape[0], math.prod(ids.shape[1:])
    chosen = jax.nn.one_hot(ids.reshape(batch, positions), vocab, dtype=h.dtype)  # (batch, positions, vocab)
    flat_h = h.reshape(batch, positions, width)
    grad = curvature.grad.reshape(batch, positions, vocab)
    still = jax.tree_util.tree_map(jnp.zeros_like, params["body"])

    def derivative(position: Array, feature: Array) -> Array:
        direction = jnp.broadcast_to(position[:, None] * feature[None, :], (batch, positions, width))
        dh = tangent_walk(layer.body, params["body"], body_cache, still, direction.reshape(h.shape))[0]
        dh = jnp.zeros_like(h) if dh is None else dh
        moved = curvature.times(dh @ table.T).reshape(batch, positions, vocab)
        at = jnp.einsum("p,bpv->bv", position, chosen)  # each example's id at this position
        along = (flat_h @ feature) * jnp.einsum("btv,bv->bt", moved, at)
        along = along + (dh.reshape(batch, positions, width) @ feature) * jnp.einsum("btv,bv->bt", grad, at)
        return jnp.sum(along, axis=1)

    eye_p, eye_w = jnp.eye(positions, dtype=h.dtype), jnp.eye(width, dtype=h.dtype)
    c = jax.vmap(jax.vmap(derivative, in_axes=(None, 0)), in_axes=(0, None))(eye_p, eye_w)  # (positions, width, b)
    return jnp.einsum("bpv,pjb->vj", chosen, c)


def diag_hessian(net: LayerProtocol, loss: Loss, hutchinson_samples: int | None = None) -> Callable[..., Params]:
    """``f(params, x, targets)``: the exact diagonal of ``H``, the Hessian of ``L = mean_b l_b`` with respect to
    every parameter.

    ``H = GGN + (the layers' own second-derivative terms)``: the walk carries each example's Hessian with respect to
    the current activation as signed columns plus a diagonal (:mod:`mnet.core.curvature`), starting from the
    loss Hessian's square root; every activation adds ``phi''(z) * g`` (``g`` the gradient reaching it) to the
    diagonal. Dense, Conv2D, pools, elementwise activations (Softmax too), Dropout, Flatten, Reshape, Embedding,
    LayerNorm, RMSNorm, the gated MLP and the combinators have second-order rules, and a table used twice (tied
    embeddings) adds its uses' mixed block (:func:`tied_cross_diagonal`); a parameterless layer with a
    Hessian-vector rule and none of its own (the attention cores) gets its curvature from that rule
    (:func:`from_hessian_vector_rule`, exact, but ``O(n)`` passes for an input of ``n`` numbers per example). A
    network holding any other layer (a user's layer with parameters and no ``diag_hessian`` rule, nor
    ``curvature_free = True``) raises an error naming it.

    Exactness costs memory: every position of a sequence model adds columns the size of an example. Where that is
    too much (a long-context transformer), ``hutchinson_samples=S`` gives instead ``f(params, x, targets, *, key)``:
    the unbiased estimate ``mean_s v_s * (H v_s)`` over ``S`` Rademacher vectors ``v_s`` (Hutchinson 1990; Bekas et
    al. 2007), each ``H v`` the hand-derived :func:`mnet.hessian_vector_product`; its variance is
    ``sum_{j != i} H_ij^2 / S`` per entry.

    Returns:
        A pytree like ``params``.
    """
    if hutchinson_samples is not None:
        return _hutchinson(net, loss, hutchinson_samples)

    def diag_hessian_fn(
        params: Params, x: Array, targets: Array, *, state: Any = None, mask: Array | None = None
    ) -> Params:
        masked_loss, targets = with_mask(loss, targets, mask)
        outputs, cache = call_forward(net, params, x, state=state, mask=mask)
        start = Curvature.start(
            masked_loss.per_example_grad(outputs, targets), masked_loss.hessian_sqrt(outputs, targets)
        )
        total = walk(net, DIAG_HESSIAN, params, (cache,), (start,))[0]
        return jax.tree_util.tree_map(lambda d: d / x.shape[0], total)

    return diag_hessian_fn


def per_example_diag_hessian(net: LayerProtocol, loss: Loss) -> Callable[..., Params]:
    """``f(params, x, targets)``: each example's own exact Hessian diagonal, ``diag(d^2 l_b / d params^2)``, of
    its loss ``l_b`` (the convention of :func:`mnet.per_example_grads`; BackPACK's ``BatchDiagHessian`` of a mean
    loss is this divided by the batch).

    Each example is a batch of one, whose mean loss is ``l_b`` itself: :func:`diag_hessian`'s walk vectorised over
    the examples (``jax.vmap``, no differentiation), so the cost is that of the summed diagonal with every share
    kept per example. A padding ``mask`` goes with its example's row.

    Returns:
        A pytree like ``params`` whose every leaf has a leading batch axis; :func:`diag_hessian` is its mean.
    """
    single = diag_hessian(net, loss)

    def per_example_diag_hessian_fn(
        params: Params, x: Array, targets: Array, *, state: Any = None, mask: Array | None = None
    ) -> Params:
        def one(x_b: Array, t_b: Array, m_b: Array | None) -> Params:
            return single(params, x_b[None], t_b[None], state=state, mask=None if m_b is None else m_b[None])

        return jax.vmap(one)(x, targets, mask)

    return per_example_diag_hessian_fn


def _hutchinson(net: LayerProtocol, loss: Loss, samples: int) -> Callable[..., Params]:
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise SettingError(f"diag_hessian: hutchinson_samples must be a positive int, got {samples!r}")
    product = hessian_vector_product(net, loss)

    def hutchinson_fn(
        params: Params,
        x: Array,
        targets: Array,
        *,
        key: Array | None = None,
        state: Any = None,
        mask: Array | None = None,
    ):
        if key is None:
            raise SettingError("diag_hessian(hutchinson_samples=...) draws random vectors: pass key=...")
        leaves, tree = jax.tree_util.tree_flatten(params)

        def one(sample_key: Array) -> Params:
            keys = jax.random.split(sample_key, len(leaves))
            signs = [jax.random.rademacher(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
            v = jax.tree_util.tree_unflatten(tree, signs)
            return jax.tree_util.tree_map(jnp.multiply, v, product(params, x, targets, v, state=state, mask=mask))

        def accumulate(total: Params, sample_key: Array) -> tuple[Params, None]:
            return jax.tree_util.tree_map(jnp.add, total, one(sample_key)), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        total, _ = jax.lax.scan(accumulate, zeros, jax.random.split(key, samples))
        return jax.tree_util.tree_map(lambda t: t / samples, total)

    return hutchinson_fn
