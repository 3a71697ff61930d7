"""The referee: JAX's automatic differentiation and finite differences, against the hand-derived path.

The autodiff side of every comparison comes from :mod:`mnet.checking.reference`; with :mod:`mnet.bench` (where autodiff is
a benchmark contender) and :mod:`mnet.checking.layer_check`, these are the only library modules that call
``jax.grad``/``jax.vjp``: everything else in mnet is hand-derived.

Three comparisons, from coarse to fine:

* :func:`compare_gradients`: the hand-derived gradient of a loss against ``jax.value_and_grad``, leaf by leaf,
  and optionally against central finite differences computed in float64;
* its layer-by-layer part: each layer's ``backward`` against ``jax.vjp`` of its ``apply`` at the activations
  and cotangents of the actual input, so a wrong rule is pinned to one layer and one leaf;
* :func:`compare_cost`: the compiled hand-derived and autodiff gradient functions, by XLA's cost analysis and
  by measured time, side by side in one process.

Tolerances are relative to the reference leaf's largest entry (:func:`relative_error`) and scale with the
dtype's machine epsilon (:func:`tolerance`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnet.checking.agreement import (
    FINITE_DIFFERENCE_TOLERANCE,
    FULL_DIFFERENCE_SIZE,
    RANDOM_DIRECTIONS,
    SAMPLED_COORDINATES,
    Agreement,
    coarsest,
    largest_entry,
    tolerance,
    working_precision,
)
from mnet.checking.gradient_report import GradientReport, LayerRow, LeafRow
from mnet.checking.reference import autodiff_value_and_grad, layer_vjp
from mnet.checking.units import (
    jitted_forward,
    output_cotangents,
    position_text,
    static_layer,
    unit_activations,
    unwrap,
)
from mnet.core.protocol import Array, LayerProtocol, Params, call_forward
from mnet.losses import Loss, with_mask
from mnet.quantities.gradient import value_and_grad

Layer = LayerProtocol


@functools.partial(jax.jit, static_argnums=0)
def _backward_and_vjp(layer, params: Params, cache, x: Array, dy: Array, mask: Array | None):
    """One layer's hand backward and ``jax.vjp`` of its ``apply``, compiled together (eager JAX would compile
    every primitive on its own, which is most of the cost for small layers)."""
    layer = unwrap(layer)
    return layer.backward(params, cache, dy), layer_vjp(layer, params, x, dy, mask=mask)


def _layer_rows(
    net: Layer, loss: Loss, params: Params, x: Array, targets: Array, mask: Array | None, precision=None
) -> tuple[LayerRow, ...]:
    """At every unit of the network (:mod:`mnet.checking.units`: inside serial, residual and parallel blocks alike),
    its ``backward`` against ``jax.vjp`` of its ``apply`` at its actual input and parameters and the cotangent that
    reaches its output (autodiff's), so that a wrong rule is pinned to the one unit that has it."""
    units = unit_activations(net, params, x, mask)
    cotangents = output_cotangents(net, loss, params, x, targets, units, mask)
    rows = []
    for unit, cotangent in zip(units, cotangents):
        _, cache = jitted_forward(static_layer(unit.layer), unit.params, unit.x, unit.mask)
        (dparams, dx), (dparams_ref, dx_ref) = _backward_and_vjp(
            static_layer(unit.layer), unit.params, cache, unit.x, cotangent, unit.mask
        )
        tol = tolerance(coarsest(cotangent.dtype, precision))
        scale = largest_entry((dparams_ref, dx_ref))
        parts = {
            f"d{jax.tree_util.keystr(path) or 'params'}": Agreement.of(mine, ref, tol, scale)
            for (path, mine), ref in zip(
                jax.tree_util.tree_leaves_with_path(dparams), jax.tree_util.tree_leaves(dparams_ref)
            )
        }
        if jnp.issubdtype(jnp.asarray(unit.x).dtype, jnp.inexact):  # integer ids (Embedding) have no gradient
            parts["dx"] = Agreement.of(dx, dx_ref, tol, scale)
        rows.append(LayerRow(position_text(unit.position), repr(unit.layer), parts))
    return tuple(rows)


def _finite_difference_rows(net, loss, params, x, targets, grads, grads_ref, seed, mask=None, mode=None):
    """Central differences of the loss in float64, per leaf: every coordinate of a small leaf; a seeded sample
    of coordinates plus random unit directions for a large one. Returns (hand vs FD, autodiff vs FD, label)."""
    rng = np.random.default_rng(seed)
    with jax.enable_x64(True):
        params64 = jax.tree_util.tree_map(lambda p: jnp.asarray(np.asarray(p, np.float64)), params)
        x64 = (
            jnp.asarray(np.asarray(x, np.float64))
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
            else jnp.asarray(x)
        )
        targets64 = (
            jnp.asarray(np.asarray(targets, np.float64))
            if jnp.issubdtype(jnp.asarray(targets).dtype, jnp.floating)
            else jnp.asarray(targets)
        )
        leaves, treedef = jax.tree_util.tree_flatten(params64)
        mode64 = {
            name: (
                jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float64)), value)
                if name == "state"
                else value
            )
            for name, value in (mode or {}).items()
        }
        scale = largest_entry(grads_ref)
        step = float(np.finfo(np.float64).eps) ** (1 / 3)
        results = []
        for index, (leaf, hand, ref) in enumerate(
            zip(leaves, jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref))
        ):
            size = leaf.size
            if size <= FULL_DIFFERENCE_SIZE:
                directions = np.eye(size)
                label = f"all {size}"
            else:
                picked = rng.choice(size, SAMPLED_COORDINATES, replace=False)
                random = rng.normal(size=(RANDOM_DIRECTIONS, size))
                directions = np.concatenate(
                    [np.eye(size)[picked], random / np.linalg.norm(random, axis=1, keepdims=True)]
                )
                label = f"{SAMPLED_COORDINATES} of {size} + {RANDOM_DIRECTIONS} dirs"
            # One step scaled to the leaf's magnitude, the same for every direction so the batch stays one call.
            h = step * max(1.0, float(jnp.max(jnp.abs(leaf))))

            def loss_at(flat_leaf, index=index, shape=leaf.shape):
                moved = list(leaves)
                moved[index] = flat_leaf.reshape(shape)
                moved_params = jax.tree_util.tree_unflatten(treedef, moved)
                return loss.value(call_forward(net, moved_params, x64, **mode64, mask=mask)[0], targets64)

            evaluate = jax.jit(jax.vmap(loss_at))
            base = leaf.ravel()
            d = jnp.asarray(directions)
            slopes = np.asarray((evaluate(base + h * d) - evaluate(base - h * d)) / (2 * h))
            hand_dirs = directions @ np.asarray(hand, np.float64).ravel()
            ref_dirs = directions @ np.asarray(ref, np.float64).ravel()
            tol = max(FINITE_DIFFERENCE_TOLERANCE, tolerance(jnp.asarray(hand).dtype))
            results.append(
                (Agreement.of(hand_dirs, slopes, tol, scale), Agreement.of(ref_dirs, slopes, tol, scale), label)
            )
    return results


def compare_gradients(
    net: Layer,
    loss: Loss,
    params: Params,
    x: Array,
    targets: Array,
    *,
    finite_differences: bool = False,
    layer_by_layer: bool = True,
    seed: int = 0,
    mask: Array | None = None,
    key: Array | None = None,
    train: bool = False,
    state: Any = None,
) -> GradientReport:
    """Compare the hand-derived gradient with ``jax.grad`` (and with finite differences when asked).

    Arguments:
        net, loss: the network and loss whose gradient is checked.
        params, x, targets: where it is checked; comparisons run in the dtype of ``params``.
        finite_differences: also compare both gradients against central differences computed in float64
            (every coordinate of leaves up to 64 entries; for larger leaves 24 seeded coordinates and 4 random
            unit directions), tolerance :data:`FINITE_DIFFERENCE_TOLERANCE`.
        layer_by_layer: also check every layer's ``backward`` against ``jax.vjp`` of its ``apply`` at the
            actual activations, which names the layer where a disagreement starts.
        seed: seeds the sampled coordinates and directions of the finite differences.
        mask: a padding mask ``(batch, T)`` for sequences of several lengths (as :func:`mnet.value_and_grad`
            takes it); every attention layer's row is checked with it.
        key, train, state: the mode the network runs in, as :func:`mnet.value_and_grad` takes them: a network with
            Dropout in training mode (``key=``, ``train=True``: both paths draw the same masks), BatchNorm in
            evaluation mode (``state=`` its running statistics) or in training mode (``train=True``). The
            layer-by-layer rows run each unit deterministically, so with any of these they are left out and the
            report's notes say so.

    Returns:
        A :class:`GradientReport`; ``report.ok`` is the verdict, ``str(report)`` a table, ``report.to_dict()``
        plain data.
    """
    masked_loss, masked_targets = with_mask(loss, targets, mask)
    mode = {
        name: value for name, value in (("key", key), ("train", train or None), ("state", state)) if value is not None
    }
    hand_value_and_grad = functools.partial(value_and_grad(net, loss), **mode)
    value, grads = jax.jit(hand_value_and_grad)(params, x, targets, mask=mask)
    # Mixed precision: float32 gradients from bfloat16 products are judged by bfloat16's tolerance.
    precision = working_precision(hand_value_and_grad, params, x, targets, mask=mask)
    reference = functools.partial(autodiff_value_and_grad(net, loss), **mode)
    reference_value, grads_ref = jax.jit(reference)(params, x, targets, mask=mask)
    dtype = (
        str(jax.tree_util.tree_leaves(grads)[0].dtype)
        if jax.tree_util.tree_leaves(grads)
        else str(jnp.asarray(x).dtype)
    )
    differences = (
        _finite_difference_rows(net, masked_loss, params, x, masked_targets, grads, grads_ref, seed, mask, mode)
        if finite_differences
        else None
    )
    rows = []
    scale = largest_entry(grads_ref)
    for index, ((path, hand), ref) in enumerate(
        zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(grads_ref))
    ):
        agreement = Agreement.of(hand, ref, tolerance(coarsest(hand.dtype, precision)), scale)
        if differences is None:
            rows.append(LeafRow(jax.tree_util.keystr(path), tuple(hand.shape), agreement))
        else:
            fd_hand, fd_ref, label = differences[index]
            rows.append(LeafRow(jax.tree_util.keystr(path), tuple(hand.shape), agreement, fd_hand, fd_ref, label))
    notes: tuple[str, ...] = ()
    if not np.isclose(float(value), float(reference_value), rtol=tolerance(coarsest(dtype, precision)), atol=0):
        notes = (f"the loss values differ: {float(value)!r} vs {float(reference_value)!r}",)
    if mode and layer_by_layer:
        notes += (f"layer-by-layer rows left out: they run each unit deterministically, not with {', '.join(mode)}",)
        layer_by_layer = False
    return GradientReport(
        rows=tuple(rows),
        layers=_layer_rows(net, loss, params, x, targets, mask, precision) if layer_by_layer else (),
        value=float(value),
        reference_value=float(reference_value),
        dtype=dtype,
        finite_differences=finite_differences,
        notes=notes,
    )
