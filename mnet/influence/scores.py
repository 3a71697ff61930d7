"""Influence scores between query and training examples, ``score(q, n) = g_q^T (C + damping I)^-1 g_n``, and what
is read from them: self-influence and each query's most helpful and most harmful training examples.

Memory. The queries' gradients are preconditioned once, ``v_q = (C + damping I)^-1 g_q`` (a stack of ``Q`` trees
like the params), and no training gradient is ever built: ``<g_n, v_q>`` is the derivative of example ``n``'s
loss along ``v_q``, ``(dl_n / dy_n) . (J_n v_q)``, so a training batch is scored by one forward pass, each query's
tangent pass through its cache (the hand-derived forward mode, :func:`mnet.core.tangent.tangent_walk`) and a dot
with the loss's per-example output gradients. For a dense layer the tangent pass's share is ``a_nt v_q`` and the
dot takes it to ``sum_t a_nt v_q s_nt^T``, the per-example inner-product rule; every layer with a tangent rule
(all of mnet's) is covered without a rule of its own. Memory is ``O(parameters x queries)`` plus one batch's
activations per query, however large the training set (:func:`pairwise_scores` compiles the whole set into one
program whose memory the tests read from XLA).

Signs follow Kronfluence: a positive score is a helpful example (a step on its loss lowers the query's loss to
first order), a negative one harmful.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from tqdm import tqdm

from mnet.core.chunks import chunks, split_batches
from mnet.core.devices import make_mesh, place, replicated, rows_sharding
from mnet.core.protocol import Array, LayerProtocol, Params, call_forward
from mnet.core.tangent import tangent_walk
from mnet.errors import DataError, SettingError
from mnet.influence.preconditioner import PRECONDITIONERS, Preconditioner, fit_preconditioner, on_one_device
from mnet.losses import Loss, with_mask
from mnet.quantities.kronecker import check_kind
from mnet.quantities.per_example import per_example_grads
from mnet.quantities.tangent import input_tangent

FALLBACKS = (None, "diag")


def batch_scores(
    net: LayerProtocol, loss: Loss, params: Params, queries: Params, x: Array, targets: Array, mask: Array | None = None
) -> Array:
    """``(Q, batch)``: ``<g_n, v_q>`` for every preconditioned query ``v_q`` (``queries``, leading axis ``Q``) and
    every example of the batch, by tangent passes (see the module's docstring); under a padding ``mask`` the padded
    positions count for nothing."""
    masked_loss, targets = with_mask(loss, targets, mask)
    outputs, cache = call_forward(net, params, x, mask=mask)
    cotangents = masked_loss.per_example_grad(outputs, targets).reshape(x.shape[0], -1)

    def along(v: Params) -> Array:
        dy, _ = tangent_walk(net, params, cache, v, input_tangent(x, None))
        return (
            jnp.zeros(cotangents.shape[0], cotangents.dtype)
            if dy is None
            else jnp.sum(dy.reshape(cotangents.shape) * cotangents, axis=1)
        )

    return jax.vmap(along)(queries)


def pairwise_scores(net: LayerProtocol, loss: Loss, batch_size: int) -> Callable[[Params, Params, Array, Array], Array]:
    """``f(params, queries, x, targets) -> (Q, n)``: :func:`batch_scores` over a whole training set in one program,
    ``lax.map`` over chunks of ``batch_size`` examples (the rows that do not fill a chunk scored apart)."""

    def pairwise_scores_fn(params: Params, queries: Params, x: Array, targets: Array) -> Array:
        (xs, ts), rest = split_batches((x, targets), batch_size)
        per_chunk = jax.lax.map(lambda chunk: batch_scores(net, loss, params, queries, *chunk), (xs, ts))
        scores = jnp.moveaxis(per_chunk, 0, 1).reshape(per_chunk.shape[1], -1)
        return scores if rest is None else jnp.concatenate([scores, batch_scores(net, loss, params, queries, *rest)], 1)

    return pairwise_scores_fn


@partial(jax.jit, static_argnums=(0, 1))
def scores_chunk(net, loss, params, queries, x, targets, mask):
    return batch_scores(net, loss, params, queries, x, targets, mask)


@partial(jax.jit, static_argnums=(0, 1, 2))
def preconditioned_gradients(net, loss, preconditioner, params, x, targets, mask, arrays):
    per_example: Callable[..., Params] = per_example_grads(net, loss)
    grads = per_example(params, x, targets, mask=mask)
    return with_arrays(preconditioner, arrays).solve(grads), grads


def arrays_of(preconditioner: Preconditioner) -> tuple:
    return (preconditioner.diagonal, preconditioner.blocks, preconditioner.dense)


def with_arrays(preconditioner: Preconditioner, arrays: tuple) -> Preconditioner:
    """The preconditioner with its fitted arrays traced (passed to a jitted function as arguments, not constants)."""
    return Preconditioner(preconditioner.name, preconditioner.damping, *arrays)


def static(preconditioner: Preconditioner) -> Preconditioner:
    """What a jitted function may hash: the name and the damping (the arrays travel as arguments)."""
    return Preconditioner(preconditioner.name, preconditioner.damping)


class TopK(NamedTuple):
    """Per query, the ``k`` most helpful training examples (largest scores first) and the ``k`` most harmful (most
    negative first): indices into the training set ``(Q, k)`` and their scores ``(Q, k)``."""

    helpful: Array
    helpful_scores: Array
    harmful: Array
    harmful_scores: Array


def describe_data(x: Any, targets: Any) -> str:
    return f"inputs {tuple(jnp.shape(x))} {jnp.asarray(x).dtype}, targets {tuple(jnp.shape(targets))} {jnp.asarray(targets).dtype}"


def data_kind(a: Any) -> str:
    dtype = jnp.asarray(a).dtype
    return "integer" if jnp.issubdtype(dtype, jnp.integer) else "bool" if dtype == jnp.bool_ else "float"


def check_mask(mask: Any, x: Any, name: str) -> None:
    """Refuse a padding mask that does not give one row of booleans per example of ``x``."""
    if mask is None:
        return
    shape, rows = jnp.shape(mask), jnp.shape(x)[:1]
    if len(shape) != 2 or shape[:1] != rows or jnp.asarray(mask).dtype != jnp.bool_:
        raise DataError(
            f"influence: {name} must be booleans (examples, T), one row per example of inputs {tuple(jnp.shape(x))}, "
            f"got {describe_array(mask)}"
        )


def describe_array(a: Any) -> str:
    return f"{tuple(jnp.shape(a))} {jnp.asarray(a).dtype}"


def check_like(x: Any, targets: Any, train_x: Any, train_targets: Any, what: str) -> None:
    """Refuse ``what`` (queries) whose examples or labels differ in shape or kind from the training data's."""
    if jnp.shape(x)[:1] != jnp.shape(targets)[:1]:
        raise DataError(f"influence: {what} have {jnp.shape(x)[0]} inputs but {jnp.shape(targets)[0]} targets")
    same = all(
        jnp.shape(a)[1:] == jnp.shape(b)[1:] and data_kind(a) == data_kind(b)
        for a, b in ((x, train_x), (targets, train_targets))
    )
    if not same:
        raise DataError(
            f"influence: {what} ({describe_data(x, targets)}) do not match the training data "
            f"({describe_data(train_x, train_targets)}) in example shape or kind"
        )


def chunk_placement(mesh: Mesh | None) -> Callable[[tuple], tuple]:
    """``place(arrays)``: a chunk's ``(x, targets, mask)`` with its rows split over ``mesh``'s ``"data"`` devices
    (replicated when the rows do not divide evenly: the set's last, shorter chunk); left as they are without a
    mesh."""
    if mesh is None:
        return on_one_device

    def place_chunk(arrays: tuple) -> tuple:
        return place(arrays, rows_sharding(mesh, jnp.shape(arrays[0])[0]))

    return place_chunk


def data_mesh(devices: int | None, batch_size: int) -> Mesh | None:
    """The mesh for ``influence(devices=...)``: None for one device, else ``devices`` devices (0 for all) on the
    ``"data"`` axis, refusing a ``batch_size`` that does not split evenly over them."""
    if devices is None:
        return None
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 0:
        raise SettingError(f"influence: devices must be None, 0 (all) or a positive int, got {devices!r}")
    mesh = make_mesh(devices)
    count = mesh.shape["data"]
    if count == 1:
        return None
    if batch_size % count:
        raise SettingError(f"influence: batch_size {batch_size} must be divisible by the {count} devices")
    return mesh


class Influence:
    """A fitted influence model (:func:`mnet.influence`): the training data, its curvature damped, and the scores
    that follow. Every method runs by hand, chunk by chunk of ``batch_size`` training examples.

    Attributes:
        preconditioner: the fitted :class:`mnet.influence.preconditioner.Preconditioner` (its ``name`` and the
            ``damping`` used, which is ``0.1`` times the curvature's mean eigenvalue unless one was given).
        x, targets: the training data.
        mesh: the ``("data", "model")`` mesh the training chunks are split over, or None (one device).
    """

    def __init__(
        self,
        net,
        loss,
        params,
        x,
        targets,
        preconditioner: Preconditioner,
        batch_size: int,
        progress: bool,
        mask=None,
        mesh: Mesh | None = None,
    ):
        self.net, self.loss, self.params = net, loss, params
        self.x, self.targets, self.mask = x, targets, mask
        self.preconditioner, self.batch_size, self.progress = preconditioner, batch_size, progress
        self.mesh = mesh
        self.place_chunk = chunk_placement(mesh)

    def _chunk(self, part: slice) -> tuple[Array, Array, Array | None]:
        """The training rows ``part`` (inputs, targets, mask), split over the mesh's devices where there is one."""
        return self.place_chunk((self.x[part], self.targets[part], None if self.mask is None else self.mask[part]))

    @property
    def damping(self) -> float:
        return self.preconditioner.damping

    def _solved(self, x: Array, targets: Array, mask: Array | None) -> tuple[Params, Params]:
        return preconditioned_gradients(
            self.net,
            self.loss,
            static(self.preconditioner),
            self.params,
            x,
            targets,
            mask,
            arrays_of(self.preconditioner),
        )

    def preconditioned_queries(self, query_x: Array, query_targets: Array, query_mask: Array | None = None) -> Params:
        """``v_q = (C + damping I)^-1 g_q`` for every query, a tree like the params with a leading query axis."""
        check_like(query_x, query_targets, self.x, self.targets, "queries")
        check_mask(query_mask, query_x, "query_mask")
        arrays = (jnp.asarray(query_x), jnp.asarray(query_targets), query_mask)
        if self.mesh is not None:  # every device scores its training rows against all the queries
            arrays = place(arrays, replicated(self.mesh))
        return self._solved(*arrays)[0]

    def scores(self, query_x: Array, query_targets: Array, query_mask: Array | None = None) -> Array:
        """``(Q, n)``: ``g_q^T (C + damping I)^-1 g_n`` for every query ``q`` and training example ``n``.

        Arguments:
            query_x, query_targets: the queries, shaped and typed as the training data.
            query_mask: the queries' padding mask (``(Q, T)``, True at tokens), or None.

        Returns:
            The scores, a positive one helpful.
        """
        queries = self.preconditioned_queries(query_x, query_targets, query_mask)
        parts = chunks(self.x.shape[0], self.batch_size)
        bar = tqdm(parts, desc="influence", unit="batch", file=sys.stderr, disable=not self.progress)
        scored = [scores_chunk(self.net, self.loss, self.params, queries, *self._chunk(p)) for p in bar]
        return jnp.concatenate(scored, axis=1)

    def self_influence(self) -> Array:
        """``(n,)``: every training example's ``g_n^T (C + damping I)^-1 g_n`` (large for examples the model finds
        atypical, a mislabeled one most of all). Each batch's per-example gradients are built here, a batch at a
        time: a quadratic form needs each gradient whole."""
        parts = chunks(self.x.shape[0], self.batch_size)
        bar = tqdm(parts, desc="self-influence", unit="batch", file=sys.stderr, disable=not self.progress)
        values = []
        for part in bar:
            solved, grads = self._solved(*self._chunk(part))
            values.append(
                sum(
                    jnp.sum((s * g).reshape(g.shape[0], -1), axis=1)
                    for s, g in zip(*map(jax.tree_util.tree_leaves, (solved, grads)))
                )
            )
        return jnp.concatenate(values)

    def top_k(self, query_x: Array, query_targets: Array, k: int, query_mask: Array | None = None) -> TopK:
        """Each query's ``k`` most helpful and ``k`` most harmful training examples (:class:`TopK`)."""
        n = self.x.shape[0]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise SettingError(f"influence top_k: k must be an int in [1, {n}] (the training set's size), got {k!r}")
        scores = self.scores(query_x, query_targets, query_mask)
        helpful_scores, helpful = jax.lax.top_k(scores, k)
        harmful_scores, harmful = jax.lax.top_k(-scores, k)
        return TopK(helpful, helpful_scores, harmful, -harmful_scores)


def influence(
    net: LayerProtocol,
    loss: Loss,
    params: Params,
    x: Array,
    targets: Array,
    *,
    preconditioner: str = "ekfac",
    kind: str = "kflr",
    damping: float | None = None,
    batch_size: int = 256,
    key: Array | None = None,
    fallback: str | None = None,
    progress: bool = False,
    mask: Array | None = None,
    devices: int | None = None,
) -> Influence:
    """Fit an influence model on the training data ``(x, targets)``: the curvature ``C`` once, over the whole set.

    Arguments:
        net, loss, params: the trained network, its loss and its parameters.
        x, targets: the training data (the examples scored).
        preconditioner: ``"ekfac"`` (default, as Kronfluence), ``"kfac"``, ``"diag"``, ``"identity"`` (gradient
            similarity, ``g_q^T g_n / (1 + damping)``) or ``"ggn"`` (the dense curvature, for networks of at most
            10,000 parameters: the reference).
        kind: the curvature's columns: ``"kflr"`` (the GGN), ``"kfac"`` (the Fisher, one sample per example: needs
            ``key``) or ``"empirical"`` (the empirical Fisher).
        damping: ``damping > 0`` added to ``C``; None for ``0.1`` times ``C``'s mean eigenvalue.
        batch_size: training examples per compiled chunk.
        key: the samples' key for ``kind="kfac"``.
        fallback: None (a layer with parameters but no Kronecker structure, such as a LayerNorm, is refused by name
            for ``"kfac"``/``"ekfac"``) or ``"diag"`` (such layers are preconditioned by ``C``'s diagonal).
        progress: a progress bar over the training batches on standard error.
        mask: the training sequences' padding mask (``(n, T)`` booleans, True at tokens), or None: padded positions
            count for nothing in the curvature, the scores and self-influence (the queries take their own
            ``query_mask``).
        devices: None (one device) or the number of devices (0 for all of them, every process's after
            :func:`mnet.distributed.initialize`) to split every training chunk over: the curvature's chunk sums are
            all-reduced, each device scores and takes the self-influence of its own rows, and the queries are
            replicated. ``batch_size`` must divide evenly over the devices.

    Returns:
        An :class:`Influence`.
    """
    if preconditioner not in PRECONDITIONERS:
        raise SettingError(f"influence: preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
    check_kind(kind, "influence")
    if fallback not in FALLBACKS:
        raise SettingError(f"influence: fallback must be one of {FALLBACKS}, got {fallback!r}")
    if damping is not None and (isinstance(damping, bool) or not isinstance(damping, int | float) or not damping > 0):
        raise SettingError(f"influence: damping must be a positive number (or None for the default), got {damping!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SettingError(f"influence: batch_size must be a positive int, got {batch_size!r}")
    mesh = data_mesh(devices, batch_size)
    x, targets = jnp.asarray(x), jnp.asarray(targets)
    check_like(x, targets, x, targets, "the training data")
    check_mask(mask, x, "mask")
    mask = None if mask is None else jnp.asarray(mask)
    if mesh is not None:
        params = place(params, replicated(mesh))
    fitted = fit_preconditioner(
        net,
        loss,
        params,
        x,
        targets,
        name=preconditioner,
        kind=kind,
        damping=damping,
        batch_size=batch_size,
        key=key,
        mask=mask,
        fallback=fallback,
        place=chunk_placement(mesh),
    )
    return Influence(net, loss, params, x, targets, fitted, batch_size, progress, mask, mesh)
