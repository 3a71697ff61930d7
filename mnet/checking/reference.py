"""The referee's side: every hand-derived quantity computed again by JAX's automatic differentiation.

Nothing on the hand-derived path imports this module. The rest of :mod:`mnet.checking` (reports for users),
:mod:`mnet.bench` (where autodiff is a contender), :mod:`mnet.training` (``grad="autodiff"``) and the tests use it.
Besides this package, only :mod:`mnet.bench` calls ``jax.grad``, ``jax.vjp`` or ``jax.jacrev`` itself;
:func:`mnet.with_manual_backward` defines a ``custom_vjp`` for them to call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp

from mnet.core.paths import at_path, replaced_at
from mnet.core.protocol import Array, Params, call_forward
from mnet.core.state import update_state
from mnet.losses import Loss, with_mask
from mnet.quantities.ntk import contract_jacobians, contract_stacks


def autodiff_value_and_grad(net: Any, loss: Loss) -> Callable[..., tuple[Array, Params]]:
    """The reference: ``jax.value_and_grad`` of ``loss.value(net.apply(params, x), targets)``.

    Same signature as :func:`mnet.value_and_grad`, so either plugs into the same training or checking code.
    """

    def objective(
        params: Params, x: Array, targets: Array, *, key=None, train: bool = False, mask=None, state=None
    ) -> Array:
        masked_loss, targets = with_mask(loss, targets, mask)
        return masked_loss.value(call_forward(net, params, x, key, train, state, mask=mask)[0], targets)

    return jax.value_and_grad(objective)


def autodiff_value_grad_and_state(net: Any, loss: Loss) -> Callable[..., tuple[Array, Params, Any]]:
    """The reference for :func:`mnet.value_grad_and_state`: ``jax.value_and_grad`` of the training-mode loss, the
    new state read from the same pass's cache (an auxiliary output)."""

    def objective(params: Params, state: Any, x: Array, targets: Array, key) -> tuple[Array, Any]:
        outputs, cache = call_forward(net, params, x, key, True, state)
        return loss.value(outputs, targets), update_state(net, state, cache)

    def value_grad_and_state_fn(params: Params, state: Any, x: Array, targets: Array, *, key=None):
        (value, new_state), grads = jax.value_and_grad(objective, has_aux=True)(params, state, x, targets, key)
        return value, grads, new_state

    return value_grad_and_state_fn


def layer_vjp(
    layer: Any, params: Params, x: Array, dy: Array, *, key=None, train: bool = False, mask: Array | None = None
) -> tuple[Params, Array]:
    """``jax.vjp`` of the layer's output at ``(params, x)`` (with its padding ``mask``) applied to ``dy``:
    ``(dparams, dx)``."""
    return jax.vjp(lambda p, inputs: call_forward(layer, p, inputs, key, train, mask=mask)[0], params, x)[1](dy)


def layer_jvp(layer: Any, params: Params, x: Array, dparams: Params, dx: Array | None) -> Array:
    """``jax.jvp`` of the layer's output at ``(params, x)`` along ``(dparams, dx)``; ``dx=None`` keeps the input
    fixed (integer inputs included)."""
    if dx is None:
        return jax.jvp(lambda p: call_forward(layer, p, x)[0], (params,), (dparams,))[1]
    return jax.jvp(lambda p, inputs: call_forward(layer, p, inputs)[0], (params, x), (dparams, dx))[1]


def layer_backward_tangent(
    layer: Any, params: Params, x: Array, dy: Array, dparams: Params, dx: Array | None, dy_tangent: Array
) -> tuple[Params, Array]:
    """``jax.jvp`` of the layer's vector-Jacobian product ``(params, x, dy) -> (dparams, dx)`` along
    ``(dparams, dx, dy_tangent)``: the R-operator of its backward pass, ``(R{dparams}, R{dx})``."""
    if dx is None:
        return jax.jvp(lambda p, c: layer_vjp(layer, p, x, c), (params, dy), (dparams, dy_tangent))[1]
    return jax.jvp(lambda p, inputs, c: layer_vjp(layer, p, inputs, c), (params, x, dy), (dparams, dx, dy_tangent))[1]


def layer_per_example_vjp(layer: Any, params: Params, x: Array, dy: Array) -> tuple[Params, Array]:
    """Row ``b``: ``jax.vjp`` of example ``b``'s output alone, run as a batch of one, applied to ``dy[b]``; the
    parameter part keeps a leading batch axis."""

    def one(x_b, dy_b):
        return layer_vjp(layer, params, x_b[None], dy_b[None])

    grads, dx = jax.vmap(one)(x, dy)
    return grads, jax.tree_util.tree_map(lambda a: a.reshape((a.shape[0],) + a.shape[2:]), dx)


def layer_ntk_share(layer: Any, params: Params, x1: Array, x2: Array, dys1: Array, dys2: Array) -> Array:
    """``sum_k <g1[k, a], g2[k, c]>`` with ``g[k, b]`` example ``b``'s parameter vjp of the cotangent ``dys[k, b]``."""
    per1 = jax.vmap(lambda dy: layer_per_example_vjp(layer, params, x1, dy)[0])(dys1)
    per2 = jax.vmap(lambda dy: layer_per_example_vjp(layer, params, x2, dy)[0])(dys2)
    return contract_stacks(per1, per2)


#: Above this many parameters a layer's Hessian diagonal is checked at a random sample of coordinates.
DIAG_HESSIAN_COORDINATES = 512


def hessian_diagonal(f: Callable[[Array], Array], theta: Array, coordinates: Array) -> Array:
    """Entries ``coordinates`` of the diagonal of the Hessian of the scalar ``f`` at the flat ``theta``, each
    ``e_i^T (jax.jvp of jax.grad) e_i``, 64 at a time."""
    gradient = jax.grad(f)

    def entry(i: Array) -> Array:
        e = jnp.zeros_like(theta).at[i].set(1)
        return jax.jvp(gradient, (theta,), (e,))[1][i]

    return jax.lax.map(entry, coordinates, batch_size=64)


def layer_diag_hessian(
    layer: Any, params: Params, x: Array, grad: Array, S: Array, coordinates: Array | None = None
) -> Array:
    """The Hessian diagonal, over the parameters flattened in pytree order (``ravel_pytree``), of the layer's
    quadratic model loss ``sum_b grad[b] . y_b + 1/2 sum_(c, b) (S[c, b] . (y_b - y0_b))^2`` at ``params`` (``y0``
    the output there, held fixed): so ``grad`` is the gradient and ``sum_c S[c, b] S[c, b]^T`` the Hessian reaching
    the output, as the Hessian-diagonal walk starts. Only the ``coordinates`` given, when given."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    y0 = jax.lax.stop_gradient(call_forward(layer, params, x)[0])

    def model_loss(theta: Array) -> Array:
        y = call_forward(layer, unravel(theta), x)[0]
        residual = jnp.sum((S * (y - y0)[None]).reshape(S.shape[0], S.shape[1], -1), axis=-1)
        return jnp.sum(grad * y) + 0.5 * jnp.sum(residual**2)

    return hessian_diagonal(model_loss, flat, jnp.arange(flat.size) if coordinates is None else coordinates)


def ggn_block(layer: Any, params: Params, x: Array, H: Array, path: tuple, to_matrix, from_matrix) -> Array:
    """The exact GGN block ``J^T H J`` of one dense-like entry at ``path`` in ``params``: ``J`` the Jacobian
    (``jax.jacrev``) of the layer's output for the single example ``x`` (batch 1) with respect to the entry's matrix
    ``to_matrix(entry)`` (``[W; b]``) flattened row-major, ``H`` the Hessian reaching the output (``(m, m)``)."""
    entry = at_path(params, path)
    matrix = to_matrix(entry)

    def output(m: Array) -> Array:
        return call_forward(layer, replaced_at(params, path, from_matrix(m, entry)), x)[0].reshape(-1)

    J = jax.jacrev(output)(matrix).reshape(-1, matrix.size)
    return J.T @ H @ J


# ---------------------------------------------------------------------------------------------------------------
# Whole-network references, with the signatures of the hand-derived drivers (mnet.per_example_grads and the rest).
# ---------------------------------------------------------------------------------------------------------------


def _outputs(net: Any) -> Callable[[Params, Array], Array]:
    return lambda p, x: call_forward(net, p, x)[0]


def per_example_grads(net: Any, loss: Loss) -> Callable[[Params, Array, Array], Params]:
    """``jax.grad`` of each example's loss, run as a batch of one, vmapped."""
    apply = _outputs(net)

    def per_example_grads_fn(params: Params, x: Array, targets: Array) -> Params:
        def one(x_b: Array, t_b: Array) -> Params:
            return jax.grad(lambda q: loss.value(apply(q, x_b[None]), t_b[None]))(params)

        return jax.vmap(one)(x, targets)

    return per_example_grads_fn


def per_example_grad_norms(net: Any, loss: Loss) -> Callable[[Params, Array, Array], Array]:
    """The L2 norms of :func:`per_example_grads` over all leaves."""
    grads = per_example_grads(net, loss)

    def norms(params: Params, x: Array, targets: Array) -> Array:
        leaves = jax.tree_util.tree_leaves(grads(params, x, targets))
        return jnp.sqrt(sum(jnp.sum(g.reshape(x.shape[0], -1) ** 2, axis=1) for g in leaves))

    return norms


def output_hessians(net: Any, loss: Loss, params: Params, x: Array, targets: Array) -> Array:
    """``(batch, m, m)``: each example's Hessian (``jax.hessian``) of its own loss in its ``m`` outputs."""
    y = call_forward(net, params, x)[0]

    def one(y_b: Array, t_b: Array) -> Array:
        return jax.hessian(lambda o: loss.per_example(o[None], t_b[None])[0])(y_b).reshape(y_b.size, y_b.size)

    return jax.vmap(one)(y, targets)


def per_example_diag_ggn(net: Any, loss: Loss) -> Callable[[Params, Array, Array], Params]:
    """Row ``b``: the diagonal of ``J_b^T H_b J_b``, from ``jax.jacrev`` and :func:`output_hessians`."""
    apply = _outputs(net)

    def per_example_diag_ggn_fn(params: Params, x: Array, targets: Array) -> Params:
        batch = x.shape[0]
        J = jax.jacrev(apply)(params, x)
        H = output_hessians(net, loss, params, x, targets)
        leaves = [
            jnp.einsum("bop,boq,bqp->bp", j, H, j)
            for j in (leaf.reshape(batch, H.shape[1], -1) for leaf in jax.tree_util.tree_leaves(J))
        ]
        return jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(params),
            [d.reshape((batch,) + jnp.shape(p)) for d, p in zip(leaves, jax.tree_util.tree_leaves(params))],
        )

    return per_example_diag_ggn_fn


def diag_ggn(net: Any, loss: Loss) -> Callable[[Params, Array, Array], Params]:
    """The batch mean of :func:`per_example_diag_ggn`."""
    rows = per_example_diag_ggn(net, loss)
    return lambda params, x, targets: jax.tree_util.tree_map(lambda d: jnp.mean(d, axis=0), rows(params, x, targets))


def ggn_vector_product(net: Any, loss: Loss) -> Callable[[Params, Array, Array, Params], Params]:
    """``jax.vjp`` of ``H_y`` (:func:`output_hessians`, with the batch mean's ``1 / batch``) times ``jax.jvp``."""
    apply = _outputs(net)

    def ggn_vector_product_fn(params: Params, x: Array, targets: Array, v: Params) -> Params:
        y, y_tangent = jax.jvp(lambda q: apply(q, x), (params,), (v,))
        H = output_hessians(net, loss, params, x, targets)
        pulled = jnp.einsum("bij,bj->bi", H, y_tangent.reshape(x.shape[0], -1)).reshape(y.shape) / x.shape[0]
        return jax.vjp(lambda q: apply(q, x), params)[1](pulled)[0]

    return ggn_vector_product_fn


def hessian_vector_product(net: Any, loss: Loss) -> Callable[[Params, Array, Array, Params], Params]:
    """``jax.jvp`` of ``jax.grad`` of the loss."""
    apply = _outputs(net)

    def hessian_vector_product_fn(params: Params, x: Array, targets: Array, v: Params) -> Params:
        return jax.jvp(jax.grad(lambda q: loss.value(apply(q, x), targets)), (params,), (v,))[1]

    return hessian_vector_product_fn


def jvp(net: Any) -> Callable[..., tuple[Array, Array]]:
    """``jax.jvp`` of the outputs along ``(dparams, dx)``; ``dx=None`` keeps the input fixed."""
    apply = _outputs(net)

    def jvp_fn(params: Params, x: Array, dparams: Params, dx: Array | None) -> tuple[Array, Array]:
        if dx is None:
            return jax.jvp(lambda q: apply(q, x), (params,), (dparams,))
        return jax.jvp(apply, (params, x), (dparams, dx))

    return jvp_fn


def ntk(net: Any) -> Callable[[Params, Array, Array], Array]:
    """The contraction of two batches' ``jax.jacrev`` Jacobians."""
    apply = _outputs(net)
    return lambda params, x1, x2: contract_jacobians(jax.jacrev(apply)(params, x1), jax.jacrev(apply)(params, x2))
