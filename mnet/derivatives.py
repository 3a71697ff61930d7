"""Derivatives beyond the gradient, all hand-derived (no JAX autodiff): per-example gradients and their norms,
DP-SGD clipping, the output-parameter Jacobian, and the empirical neural tangent kernel.

Each function is a driver: one forward pass, then one walk of the network (:func:`mnet.layers.walk`) carrying
the loss's per-example cotangents (or one cotangent per output) down, every layer applying its own rule for the
quantity (``per_example_backward``, ``per_example_sq_norms``, ``ntk_contribution``) or the rule's default. A
network holding a layer with parameters but no per-example rule (a user's layer that defines ``backward``
only) is handled by the generic path instead: the hand-derived backward run one example at a time under
``jax.vmap`` (vectorisation, not differentiation), which is correct for every layer, only slower.

Notation: ``l_b`` is example ``b``'s loss (``loss.per_example``), ``g_b = d l_b / d params`` its gradient,
``y`` the network output with ``K`` entries per example.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mnet.backprop import value_and_grad
from mnet.layers.base import (
    NTK,
    PER_EXAMPLE_BACKWARD,
    PER_EXAMPLE_SQ_NORMS,
    Array,
    LayerProtocol,
    MissingRule,
    Params,
    batch_sq_norms,
    call_forward,
)
from mnet.losses import Loss


def _one_at_a_time(net: LayerProtocol, loss: Loss) -> Callable[[Params, Array, Array], Params]:
    """Per-example gradients for any layer: the batch-of-one gradient (whose mean is ``l_b`` itself) vmapped."""
    single = value_and_grad(net, loss)
    return jax.vmap(lambda params, x, t: single(params, x[None], t[None])[1], in_axes=(None, 0, 0))


def per_example_grads(net: LayerProtocol, loss: Loss) -> Callable[[Params, Array, Array], Params]:
    """``f(params, x, targets)``: every example's gradient of its own loss ``l_b``.

    One forward pass over the batch; the loss's per-example cotangents ``d l_b / d y_b``; then each layer's
    ``per_example_backward`` (for a dense layer the outer products ``dW_b = a_b dz_b^T`` in one batched product).

    Returns:
        A pytree like ``params`` whose every leaf has a leading batch axis.
    """

    def per_example_grads_fn(params: Params, x: Array, targets: Array, *, state: Any = None) -> Params:
        outputs, cache = call_forward(net, params, x, state=state)
        try:
            return PER_EXAMPLE_BACKWARD.run(net, params, cache, loss.per_example_grad(outputs, targets))[0]
        except MissingRule:
            return _one_at_a_time(net, loss)(params, x, targets)

    return per_example_grads_fn


def _sq_norms(
    net: LayerProtocol, loss: Loss, params: Params, cache: Any, x: Array, targets: Array, outputs: Array
) -> Array:
    try:
        return PER_EXAMPLE_SQ_NORMS.run(net, params, cache, loss.per_example_grad(outputs, targets))[0]
    except MissingRule:
        return batch_sq_norms(_one_at_a_time(net, loss)(params, x, targets), x.shape[0], outputs.dtype)


def per_example_grad_norms(net: LayerProtocol, loss: Loss) -> Callable[[Params, Array, Array], Array]:
    """``f(params, x, targets) -> (batch,)``: the L2 norm over all leaves of each example's gradient ``g_b``.

    Dense layers never build ``g_b``: ``||dW_b||^2 = ||a_b||^2 ||dz_b||^2`` and ``||db_b||^2 = ||dz_b||^2``, so the
    cost is one forward and one backward pass of cotangents, plus O(batch * width) per layer.
    """

    def norms_fn(params: Params, x: Array, targets: Array, *, state: Any = None) -> Array:
        outputs, cache = call_forward(net, params, x, state=state)
        return jnp.sqrt(_sq_norms(net, loss, params, cache, x, targets, outputs))

    return norms_fn


def clipped_value_and_grad(
    net: LayerProtocol, loss: Loss, clip_norm: float
) -> Callable[[Params, Array, Array], tuple[Array, Params]]:
    """DP-SGD's clipped gradient: ``f(params, x, targets) -> (loss value, mean_b g_b * min(1, C / ||g_b||))``.

    Computed without per-example gradients: one forward pass, the per-example norms from the cotangents, then
    a second backward pass whose cotangent rows are reweighted by ``min(1, C / ||g_b||) / batch``. Backward is
    linear in the cotangent, so that pass returns exactly the sum of the clipped per-example gradients.
    Same signature as :func:`mnet.value_and_grad`, so ``mnet.fit(..., grad=clipped_value_and_grad(...))`` trains
    with it; add noise with :func:`dp_noise`.

    Arguments:
        clip_norm: ``C``, the largest L2 norm an example's gradient may keep.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm!r}")

    def clipped_fn(params: Params, x: Array, targets: Array) -> tuple[Array, Params]:
        outputs, cache = net.forward(params, x)
        cotangents = loss.per_example_grad(outputs, targets)
        norms = jnp.sqrt(_sq_norms(net, loss, params, cache, x, targets, outputs))
        factors = jnp.minimum(1, clip_norm / jnp.maximum(norms, jnp.finfo(norms.dtype).tiny)) / x.shape[0]
        weighted = cotangents * factors.reshape((-1,) + (1,) * (cotangents.ndim - 1)).astype(cotangents.dtype)
        grads, _ = net.backward(params, cache, weighted)
        return loss.value(outputs, targets), grads

    return clipped_fn


class DPNoiseState(NamedTuple):
    key: jax.Array


def dp_noise(
    clip_norm: float, noise_multiplier: float, batch_size: int, key: jax.Array
) -> optax.GradientTransformation:
    """An optax transformation adding DP-SGD's Gaussian noise to a mean of clipped gradients:
    ``N(0, (noise_multiplier * clip_norm / batch_size)^2)`` per coordinate, a fresh key every step.

    Chain it before the optimizer: ``optax.chain(mnet.dp_noise(C, sigma, B, key), optax.sgd(lr))`` with gradients
    from :func:`clipped_value_and_grad`. (The privacy accounting for ``sigma`` is outside mnet's scope.)
    """
    scale = noise_multiplier * clip_norm / batch_size

    def init(params):
        del params
        return DPNoiseState(key)

    def update(updates, state, params=None):
        del params
        key, subkey = jax.random.split(state.key)
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        keys = jax.random.split(subkey, max(len(leaves), 1))
        noisy = [leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
        return jax.tree_util.tree_unflatten(treedef, noisy), DPNoiseState(key)

    return optax.GradientTransformation(init, update)


def _output_basis(outputs: Array) -> Array:
    """``(K, batch, *output_shape)``: for each output entry ``k``, a cotangent that is 1 there in every example."""
    batch, output_shape = outputs.shape[0], outputs.shape[1:]
    units = math.prod(output_shape)
    basis = jnp.eye(units, dtype=outputs.dtype).reshape((units, 1) + output_shape)
    return jnp.broadcast_to(basis, (units, batch) + output_shape)


def jacobian(net: LayerProtocol) -> Callable[[Params, Array], Params]:
    """``f(params, x)``: the derivative of every output with respect to every parameter, a pytree like ``params``
    whose leaves have shape ``(batch, *output_shape, *leaf.shape)``; equal to ``jax.jacrev(net.apply)(params, x)``.

    Row ``k`` is example ``b``'s gradient of output ``y_bk``: the per-example backward run with the cotangent
    ``e_k``, for all ``K`` outputs at once under ``jax.vmap``. For a dense layer ``m`` it is, entry by entry,
    ``dy_k / dW^m[j, i] = a^{m-1}_j * delta^m_{k,i}`` with ``delta^m_k`` the cotangent ``e_k`` carried back to
    ``z^m``: the derivation document's ``O_i phi^m'(...) o_j phi^{m-1}(...)`` pushed through the layers above,
    transposed to rows-are-examples (its ``W^m_{ij}`` is mnet's ``W[j, i]``).
    """

    def jacobian_fn(params: Params, x: Array, *, state: Any = None) -> Params:
        outputs, cache = call_forward(net, params, x, state=state)
        basis = _output_basis(outputs)
        try:
            per_output = jax.vmap(lambda e: PER_EXAMPLE_BACKWARD.run(net, params, cache, e)[0])(basis)
        except MissingRule:

            def one_example(x_b):
                y_b, c_b = net.forward(params, x_b[None])
                return jax.vmap(lambda e: net.backward(params, c_b, e)[0])(_output_basis(y_b)[:, :1])

            per_example = jax.vmap(one_example)(x)  # leaves (batch, K, *leaf)
            return jax.tree_util.tree_map(lambda g: g.reshape(outputs.shape + g.shape[2:]), per_example)
        return jax.tree_util.tree_map(lambda g: jnp.moveaxis(g, 0, 1).reshape(outputs.shape + g.shape[2:]), per_output)

    return jacobian_fn


def ntk(net: LayerProtocol) -> Callable[[Params, Array, Array], Array]:
    """``f(params, x1, x2) -> (batch1, batch2)``: the empirical neural tangent kernel traced over the outputs,
    ``Theta[a, c] = sum_k sum_p (dy_k(x1_a)/dp) (dy_k(x2_c)/dp)``.

    Built layer by layer from cotangents, never from the Jacobian: for a dense layer the contribution is
    ``(A1 A2^T + 1) * sum_k D1_k D2_k^T``, where ``A`` are the layer's inputs and ``D_k`` the cotangent of output
    ``k`` at its pre-activation.
    """

    def ntk_fn(params: Params, x1: Array, x2: Array, *, state: Any = None) -> Array:
        y1, cache1 = call_forward(net, params, x1, state=state)
        y2, cache2 = call_forward(net, params, x2, state=state)
        try:
            return NTK.run_pair(net, params, (cache1, cache2), (_output_basis(y1), _output_basis(y2)))
        except MissingRule:
            jac = jacobian(net)
            return contract_jacobians(jac(params, x1), jac(params, x2))

    return ntk_fn


def contract_jacobians(jacobian1: Params, jacobian2: Params) -> Array:
    """The NTK from two materialised Jacobians (leaves ``(batch, *output_shape, *leaf.shape)``): the inner product
    of example ``a``'s and example ``c``'s Jacobians over outputs and parameters, summed over the leaves."""
    leaves1, leaves2 = jax.tree_util.tree_leaves(jacobian1), jax.tree_util.tree_leaves(jacobian2)
    total = jnp.zeros((leaves1[0].shape[0], leaves2[0].shape[0]), leaves1[0].dtype)
    for a, b in zip(leaves1, leaves2):
        total = total + jnp.einsum("ap,cp->ac", a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))
    return total
