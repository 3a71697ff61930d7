"""The output-parameter Jacobian, by hand: the per-example walk once for every output unit (the seed document's
selector matrices: one cotangent per output, ``O_i``), vmapped over the output basis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mnet.core.protocol import Array, LayerProtocol, Params, call_forward
from mnet.core.walk import MissingRule
from mnet.quantities.per_example import PER_EXAMPLE_BACKWARD


def output_basis(outputs: Array) -> Array:
    """``(K, batch, *output_shape)``: for each output entry ``k``, a cotangent that is 1 there in every example."""
    batch, output_shape = outputs.shape[0], outputs.shape[1:]
    units = math.prod(output_shape)
    basis = jnp.eye(units, dtype=outputs.dtype).reshape((units, 1) + output_shape)
    return jnp.broadcast_to(basis, (units, batch) + output_shape)


def jacobian(net: LayerProtocol) -> Callable[..., Params]:
    """``f(params, x)``: the derivative of every output with respect to every parameter, a pytree like ``params``
    whose leaves have shape ``(batch, *output_shape, *leaf.shape)``; equal to ``jax.jacrev(net.apply)(params, x)``.

    Row ``k`` is example ``b``'s gradient of output ``y_bk``: the per-example backward run with the cotangent
    ``e_k``, for all ``K`` outputs at once under ``jax.vmap``. For a dense layer ``m`` it is, entry by entry,
    ``dy_k / dW^m[j, i] = a^{m-1}_j * delta^m_{k,i}`` with ``delta^m_k`` the cotangent ``e_k`` carried back to
    ``z^m``: the derivation document's ``O_i phi^m'(...) o_j phi^{m-1}(...)`` pushed through the layers above,
    transposed to rows-are-examples (its ``W^m_{ij}`` is mnet's ``W[j, i]``).
    """

    def jacobian_fn(params: Params, x: Array, *, state: Any = None, mask: Array | None = None) -> Params:
        outputs, cache = call_forward(net, params, x, state=state, mask=mask)
        basis = output_basis(outputs)
        try:
            per_output = jax.vmap(lambda e: PER_EXAMPLE_BACKWARD.run(net, params, cache, e)[0])(basis)
        except MissingRule:

            def one_example(x_b, m_b):
                y_b, c_b = call_forward(net, params, x_b[None], mask=None if m_b is None else m_b[None])
                return jax.vmap(lambda e: net.backward(params, c_b, e)[0])(output_basis(y_b)[:, :1])

            per_example = jax.vmap(one_example)(x, mask)  # leaves (batch, K, *leaf)
            return jax.tree_util.tree_map(lambda g: g.reshape(outputs.shape + g.shape[2:]), per_example)
        return jax.tree_util.tree_map(lambda g: jnp.moveaxis(g, 0, 1).reshape(outputs.shape + g.shape[2:]), per_output)

    return jacobian_fn
