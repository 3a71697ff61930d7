"""Forward mode by hand: Jacobian-vector products from every layer's tangent rule.

A layer's ``tangent(params, cache, dparams, dx) -> dy`` is its forward pass differentiated along a direction
``(dparams, dx)``, read from the cache its ``forward`` left (Dense: ``dz = dx W + x dW + db``; an activation:
``phi'(z) * dz``). The walk (:func:`mnet.core.tangent.tangent_walk`) carries the tangent from the input to the
output through every combinator, so ``jvp`` costs one forward pass plus one tangent pass, about three forward
passes' products for a dense network, and never builds a Jacobian. It is the first half of every curvature-vector
product (:mod:`mnet.quantities.ggn`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mnet.core.protocol import Array, Cache, LayerProtocol, Params, call_forward
from mnet.core.tangent import tangent_walk
from mnet.errors import SettingError


def input_tangent(x: Array, dx: Array | None) -> Array | None:
    """The tangent the walk starts from: None (zero, no products) for integer inputs or when none is given."""
    if dx is None or not jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact):
        return None
    return dx


def forward_with_tangent(
    net: LayerProtocol,
    params: Params,
    x: Array,
    dparams: Params,
    dx: Array | None,
    key=None,
    train: bool = False,
    state: Any = None,
    mask: Array | None = None,
) -> tuple[Array, Cache, Array, Any]:
    """``(y, cache, dy, record)``: the forward pass, then the tangent pass through its cache; ``record`` holds the
    tangents that reached every unit (see :func:`mnet.core.tangent.tangent_walk`)."""
    y, cache = call_forward(net, params, x, key, train, state, mask=mask)
    dy, record = tangent_walk(net, params, cache, dparams, input_tangent(x, dx))
    return y, cache, (jnp.zeros_like(y) if dy is None else dy), record


def jvp(net: LayerProtocol) -> Callable[..., tuple[Array, Array]]:
    """The hand-derived Jacobian-vector product of ``net.apply``.

    Arguments:
        net: any layer or network whose units have ``tangent`` rules (every built-in layer has one).

    Returns:
        ``f(params, x, dparams, dx, *, key=None, train=False, state=None) -> (y, dy)``, equal to
        ``jax.jvp(net.apply, (params, x), (dparams, dx))``: ``dparams`` is like ``params``; ``dx`` like ``x``, or
        None for a zero input tangent (integer inputs always have one). ``state`` (BatchNorm's running statistics)
        selects evaluation mode; without it a BatchNorm uses the batch's statistics.
    """

    def jvp_fn(
        params: Params,
        x: Array,
        dparams: Params,
        dx: Array | None = None,
        *,
        key=None,
        train: bool = False,
        state: Any = None,
        mask: Array | None = None,
    ) -> tuple[Array, Array]:
        _check_like(params, dparams)
        y, _, dy, _ = forward_with_tangent(net, params, x, dparams, dx, key, train, state, mask)
        return y, dy

    return jvp_fn


def with_manual_tangent(net: LayerProtocol) -> Callable[[Params, Array], Array]:
    """The network as ``f(params, x) -> y`` whose forward-mode derivative is the hand-derived tangent pass: the
    forward-mode twin of :func:`mnet.with_manual_backward`.

    A ``jax.custom_jvp``: ``jax.jvp``, ``jax.jacfwd`` and ``jax.linearize`` of a function of ``y`` call the layers'
    ``tangent`` rules instead of differentiating ``net.forward``. Reverse mode (``jax.grad``, ``jax.vjp``,
    ``jax.jacrev``) works too: JAX transposes the hand tangent pass, which is linear in the tangent, so it is the
    transpose of the hand rules rather than the hand ``backward``; for that use :func:`mnet.with_manual_backward`.
    ``jax.hessian`` (forward over reverse) works through it.

    ==============================  =============================  ===============================
    transformation                  ``with_manual_backward``       ``with_manual_tangent``
    ==============================  =============================  ===============================
    ``jax.grad``, ``vjp``, jacrev   the hand ``backward``          the hand tangents, transposed
    ``jax.jvp``, ``jacfwd``         refused (a ``custom_vjp``)     the hand ``tangent`` rules
    ``jax.hessian``                 refused                        yes
    ``jax.jit``, ``jax.vmap``       yes                            yes
    ==============================  =============================  ===============================

    Arguments:
        net: any layer whose units have ``tangent`` rules (every built-in layer has one).

    Returns:
        ``f(params, x) -> y``, with ``y`` equal to ``net.apply(params, x)``.
    """

    @jax.custom_jvp
    def apply(params: Params, x: Array) -> Array:
        return call_forward(net, params, x)[0]

    @apply.defjvp
    def apply_tangent(primals: tuple, tangents: tuple) -> tuple[Array, Array]:
        (params, x), (dparams, dx) = primals, tangents
        y, _, dy, _ = forward_with_tangent(net, params, x, dparams, dx)
        return y, dy

    return apply


def _check_like(params: Params, dparams: Params) -> None:
    ours, theirs = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(dparams)
    if str(ours) != str(theirs):
        raise SettingError(f"the parameter tangent must have the structure of params: expected {ours}, got {theirs}")
    for p, d in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(dparams)):
        if jnp.shape(p) != jnp.shape(d):
            raise SettingError(f"a parameter tangent leaf has shape {jnp.shape(d)} where params has {jnp.shape(p)}")
