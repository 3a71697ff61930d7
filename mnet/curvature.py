"""Curvature by hand: the diagonal of the generalised Gauss-Newton matrix, summed and per example.

Definitions. For a batch, ``L(params) = loss.value(net.apply(params, x), targets)``, the batch mean of the
per-example losses ``l_b``. ``J_b`` is the Jacobian of example ``b``'s outputs with respect to all parameters,
``H_b`` the Hessian of ``l_b`` with respect to example ``b``'s outputs, and the GGN is
``GGN = mean_b J_b^T H_b J_b``. Every loss supplies ``H_b`` in square-root form, ``H_b = sum_c S[c, b] S[c, b]^T``
(:meth:`mnet.losses.Loss.hessian_sqrt`: ``C`` = the number of outputs), or sampled from its own predictive
distribution (:meth:`mnet.losses.Loss.sampled_hessian_sqrt`), so that

    diag(J_b^T H_b J_b) = sum_c (J_b^T S[c, b])^2       (entry by entry)

and ``J_b^T S[c, b]`` is example ``b``'s backward pass of the cotangent ``S[c, b]``. The drivers run one forward
pass and one walk carrying the ``C`` columns down together (:class:`mnet.layers.base.DiagGGN`); each layer with
parameters squares and sums them against its inputs (a dense layer: ``x_b^2 (sum_c S[c, b]^2)^T``), never forming
``J``. A network holding a layer with parameters but no per-example rule is handled one example at a time instead
(its ``backward`` on a batch of one, for every column), which is exact, only slower.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mnet.forward_mode import forward_with_tangent
from mnet.layers.base import (
    DIAG_GGN,
    KRONECKER_FACTORS,
    PER_EXAMPLE_DIAG_GGN,
    Array,
    LayerProtocol,
    MissingRule,
    Params,
    call_forward,
    sum_stack,
    walk,
)
from mnet.layers.r_operator import HESSIAN_VECTOR
from mnet.layers.second_order import DIAG_HESSIAN, Curvature
from mnet.losses import Loss


def _square_root(loss: Loss, outputs: Array, targets: Array, mc_samples: int | None, key: Array | None) -> Array:
    if mc_samples is None:
        return loss.hessian_sqrt(outputs, targets)
    if key is None:
        raise ValueError(f"diag_ggn(mc_samples={mc_samples}) draws samples: pass key=jax.random.key(...)")
    return loss.sampled_hessian_sqrt(outputs, targets, key, mc_samples)


def _one_example_at_a_time(net: LayerProtocol, params: Params, x: Array, S: Array) -> Params:
    """``diag(J_b^T H_b J_b)`` for every example through ``backward`` alone: each example run as a batch of one,
    every column of its ``S`` carried back, the gradients squared and summed over the columns."""

    def one(x_b: Array, S_b: Array) -> Params:
        _, cache = net.forward(params, x_b[None])
        grads = jax.vmap(lambda column: net.backward(params, cache, column[None])[0])(S_b)
        return jax.tree_util.tree_map(lambda g: sum_stack(g * g), grads)

    return jax.vmap(one)(x, jnp.moveaxis(S, 0, 1))


def _check_samples(mc_samples: int | None) -> None:
    if mc_samples is not None and (not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1):
        raise ValueError(f"mc_samples must be a positive int (or None for the exact diagonal), got {mc_samples!r}")


def per_example_diag_ggn(net: LayerProtocol, loss: Loss, mc_samples: int | None = None) -> Callable[..., Params]:
    """``f(params, x, targets[, key=...])``: each example's own GGN diagonal, ``diag(J_b^T H_b J_b)``.

    Arguments:
        net, loss: any network, and a loss with a Hessian square root (every built-in loss).
        mc_samples: None (default) for the exact diagonal; ``S`` for a Monte-Carlo estimate from ``S`` draws per
            example from the loss's predictive distribution (then ``f`` needs ``key=``).

    Returns:
        A pytree like ``params`` whose every leaf has a leading batch axis; :func:`diag_ggn` is its mean.
    """
    _check_samples(mc_samples)

    def per_example_diag_ggn_fn(
        params: Params, x: Array, targets: Array, *, key: Array | None = None, state: Any = None
    ) -> Params:
        outputs, cache = call_forward(net, params, x, state=state)
        S = _square_root(loss, outputs, targets, mc_samples, key)
        try:
            return PER_EXAMPLE_DIAG_GGN.run(net, params, cache, S)[0]
        except MissingRule:
            return _one_example_at_a_time(net, params, x, S)

    return per_example_diag_ggn_fn


def diag_ggn(net: LayerProtocol, loss: Loss, mc_samples: int | None = None) -> Callable[..., Params]:
    """``f(params, x, targets[, key=...])``: the diagonal of ``GGN = mean_b J_b^T H_b J_b``, exact, or with
    ``mc_samples=S`` an unbiased Monte-Carlo estimate from ``S`` draws per example (``f`` then needs ``key=``).

    Dense layers never build a per-example array: their share is ``(x^2)^T (sum_c S[c]^2)`` over the batch.

    Returns:
        A pytree like ``params``.
    """
    _check_samples(mc_samples)

    def diag_ggn_fn(params: Params, x: Array, targets: Array, *, key: Array | None = None, state: Any = None) -> Params:
        outputs, cache = call_forward(net, params, x, state=state)
        total = summed_diag_ggn(net, params, x, cache, _square_root(loss, outputs, targets, mc_samples, key))
        return jax.tree_util.tree_map(lambda d: d / x.shape[0], total)

    return diag_ggn_fn


def summed_diag_ggn(net: LayerProtocol, params: Params, x: Array, cache: Any, S: Array) -> Params:
    """``sum_b diag(J_b^T S_b S_b^T J_b)`` from a forward cache and the square-root columns ``S``: the walk, or one
    example at a time for a network with a layer that has no per-example rule."""
    try:
        return DIAG_GGN.run(net, params, cache, S)[0]
    except MissingRule:
        return jax.tree_util.tree_map(lambda d: jnp.sum(d, axis=0), _one_example_at_a_time(net, params, x, S))


def diag_hessian(net: LayerProtocol, loss: Loss) -> Callable[..., Params]:
    """``f(params, x, targets)``: the exact diagonal of ``H``, the Hessian of ``L = mean_b l_b`` with respect to
    every parameter.

    ``H = GGN + (the layers' own second-derivative terms)``: the walk carries each example's Hessian with respect to
    the current activation as signed columns plus a diagonal (:mod:`mnet.layers.second_order`), starting from the
    loss Hessian's square root; every activation adds ``phi''(z) * g`` (``g`` the gradient reaching it) to the
    diagonal. Dense, Conv2D, pools, elementwise activations, Dropout, Flatten, Reshape, Embedding and the
    combinators have second-order rules; a network holding any other layer (LayerNorm, Softmax, attention, a
    user's layer without a ``diag_hessian`` rule or ``curvature_free = True``) raises an error naming it.

    Returns:
        A pytree like ``params``.
    """

    def diag_hessian_fn(params: Params, x: Array, targets: Array, *, state: Any = None) -> Params:
        outputs, cache = call_forward(net, params, x, state=state)
        start = Curvature.start(loss.per_example_grad(outputs, targets), loss.hessian_sqrt(outputs, targets))
        total = walk(net, DIAG_HESSIAN, params, (cache,), (start,))[0]
        return jax.tree_util.tree_map(lambda d: d / x.shape[0], total)

    return diag_hessian_fn


def ggn_vector_product(net: LayerProtocol, loss: Loss) -> Callable[[Params, Array, Array, Params], Params]:
    """``f(params, x, targets, v) -> GGN v``, ``v`` and the result like ``params``, without forming a matrix.

    ``GGN v = mean_b J_b^T H_b J_b v``: the tangent pass gives ``J v`` at the outputs
    (:func:`mnet.forward_mode.forward_with_tangent`), the loss applies its output Hessian
    (:meth:`mnet.losses.Loss.hessian_vector`, which carries the batch mean's ``1 / batch``), and the ordinary
    backward pass takes the result back to every parameter: one forward, one tangent and one backward pass.
    """

    def ggn_vector_product_fn(params: Params, x: Array, targets: Array, v: Params, *, state: Any = None) -> Params:
        outputs, cache, output_tangent, _ = forward_with_tangent(net, params, x, v, None, state=state)
        return net.backward(params, cache, loss.hessian_vector(outputs, targets, output_tangent))[0]

    return ggn_vector_product_fn


def hessian_vector_product(net: LayerProtocol, loss: Loss) -> Callable[[Params, Array, Array, Params], Params]:
    """``f(params, x, targets, v) -> H v``, ``H`` the Hessian of ``L = loss.value(net.apply(params, x), targets)``.

    Pearlmutter's R-operator by hand (:mod:`mnet.layers.r_operator`): the tangent pass records ``R{x}`` at every
    layer, the loss gives ``R{dL/dy} = H_y J v``, and the backward pass runs carrying the cotangent and its tangent,
    each layer adding its own second-order terms (a dense layer ``R{x}^T dz`` and ``dz dW_t^T``, an activation
    ``phi''(z) R{z} dy``). Dense, Conv2D, pools, activations (Softmax included), Dropout, Flatten, Reshape,
    Embedding, LayerNorm and the combinators have the rule; a layer without one is refused by name.
    """

    def hessian_vector_product_fn(params: Params, x: Array, targets: Array, v: Params, *, state: Any = None) -> Params:
        outputs, cache, output_tangent, record = forward_with_tangent(net, params, x, v, None, state=state)
        start = (loss.grad(outputs, targets), loss.hessian_vector(outputs, targets, output_tangent))
        return walk(net, HESSIAN_VECTOR, params, (cache, record), start)[0]

    return hessian_vector_product_fn


KRONECKER_KINDS = ("kflr", "kfac")


def is_factor_pair(node: Any) -> bool:
    """Whether ``node`` is one dense-like entry of :func:`kfac_factors`' result, ``{"A", "G"}``."""
    return isinstance(node, dict) and set(node) == {"A", "G"}


def stack_bias(grad: Params) -> Array:
    """A dense-like entry's ``{"W", "b"}`` (leading axes allowed) as the one matrix ``[W; b]`` that the Kronecker
    factors act on (``A`` over its rows, ``G`` over its columns); ``{"W"}`` alone is ``W``."""
    if "b" not in grad:
        return grad["W"]
    return jnp.concatenate([grad["W"], grad["b"][..., None, :]], axis=-2)


def unstack_bias(matrix: Array, like: Params) -> Params:
    """The inverse of :func:`stack_bias`: ``[W; b]`` back to an entry with the keys of ``like``."""
    return {"W": matrix} if "b" not in like else {"W": matrix[..., :-1, :], "b": matrix[..., -1, :]}


def kfac_factors(net: LayerProtocol, loss: Loss, kind: str = "kflr") -> Callable[..., Any]:
    """``f(params, x, targets, *, key=None)``: every layer's Kronecker factors of the GGN.

    For a dense layer ``z = a W'`` (``a`` the input with a 1 appended for the bias, ``W' = [W; b]``):
    ``A = mean_b a_b a_b^T`` and ``G = mean_b S_b S_b^T``, ``S_b`` the columns of the square root of example
    ``b``'s loss Hessian ``H_b`` carried back to ``z`` (exact, ``C`` columns, for ``kind="kflr"``; one sample
    from the loss's predictive distribution for ``kind="kfac"``, which needs ``key``). ``kron(A, G)``
    approximates the GGN block of ``concatenate([W, b[None]]).reshape(-1)`` and equals it for ``"kflr"`` at
    batch 1. Conv2D (its windows as positions) and attention's four projections (the sequence as positions)
    follow the position convention of :meth:`mnet.Dense.kronecker_factors`: every position counts as an example.

    Returns:
        A pytree like ``params`` down to each layer's entry: a dense-like entry becomes ``{"A", "G"}``; an
        attention layer's entry ``{"q", "k", "v", "o"}`` of those; a parameterless layer's stays ``()``; a layer
        with parameters but no Kronecker structure (LayerNorm, Embedding, a user's layer without a
        ``kronecker_factors`` rule) has ``None``.
    """
    if kind not in KRONECKER_KINDS:
        raise ValueError(f"kfac_factors: kind must be one of {KRONECKER_KINDS}, got {kind!r}")

    def kfac_factors_fn(
        params: Params, x: Array, targets: Array, *, key: Array | None = None, state: Any = None
    ) -> Any:
        outputs, cache = call_forward(net, params, x, state=state)
        if kind == "kflr":
            S = loss.hessian_sqrt(outputs, targets)
        elif key is None:
            raise ValueError('kfac_factors(kind="kfac") samples from the predictive distribution: pass key=...')
        else:
            S = loss.sampled_hessian_sqrt(outputs, targets, key, 1)
        return walk(net, KRONECKER_FACTORS, params, (cache,), (S,))[0]

    return kfac_factors_fn
