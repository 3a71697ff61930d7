"""``check_network``: every derivative quantity of a whole network and loss, by hand, against JAX autodiff.

In float64 (JAX x64, switched on for the check alone), at random parameters, inputs, targets and directions, each
row runs one public driver and compares it with its autodiff reference:

=========================  ===========================================================================
quantity                   reference
=========================  ===========================================================================
``value_and_grad``         ``jax.value_and_grad`` of ``loss.value(net.apply(params, x), targets)``
``per_example_grads``      ``jax.grad`` of each example's loss, run as a batch of one, vmapped
``per_example_grad_norms`` the L2 norms of those
``jacobian``               ``jax.jacrev(net.apply)``
``ntk``                    the contraction of two batches' ``jax.jacrev`` Jacobians
``jvp``                    ``jax.jvp(net.apply)`` along random parameter and input tangents
``ggn_vector_product``     ``jax.vjp`` of ``H_y`` (``jax.hessian`` of the loss in the outputs) times ``jax.jvp``
``hessian_vector_product`` ``jax.jvp`` of ``jax.grad``
``diag_ggn``               the diagonal of ``mean_b J_b^T H_b J_b`` from ``jax.jacrev`` and ``jax.hessian``
``per_example_diag_ggn``   its rows, one per example
``diag_hessian``           ``e_i^T (jax.jvp of jax.grad) e_i``, every coordinate (512 at random when larger)
``kfac_factors``           ``kron(A, G)`` of every dense-like entry at batch 1 against the exact GGN block
                           ``J^T H J`` (``jax.jacrev``), for entries with one position per example
=========================  ===========================================================================

A quantity the network does not support (a layer without a second-order rule, a loss without a Hessian square
root) is reported with the error it raises and does not fail the check; every quantity it does support must agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from mnet.checking import reference
from mnet.checking.curvature_rows import kronecker_comparison
from mnet.checking.layer_report import (
    Check,
    LayerReport,
    RuleRow,
    compare_rule,
    compared_rows,
    perturbed,
    random_input,
)
from mnet.core.protocol import LayerProtocol, Shape, call_forward, init_layer, require_layer
from mnet.errors import MnetError
from mnet.losses import Loss
from mnet.quantities.diag_hessian import diag_hessian
from mnet.quantities.ggn import diag_ggn, ggn_vector_product, per_example_diag_ggn
from mnet.quantities.gradient import value_and_grad
from mnet.quantities.hessian_vector import hessian_vector_product
from mnet.quantities.jacobian import jacobian
from mnet.quantities.kronecker import kfac_factors
from mnet.quantities.ntk import ntk
from mnet.quantities.per_example import per_example_grad_norms, per_example_grads
from mnet.quantities.tangent import jvp

#: The rows of a report, in order.
QUANTITIES = (
    "value_and_grad",
    "per_example_grads",
    "per_example_grad_norms",
    "jacobian",
    "ntk",
    "jvp",
    "ggn_vector_product",
    "hessian_vector_product",
    "diag_ggn",
    "per_example_diag_ggn",
    "diag_hessian",
    "kfac_factors",
)


def check_network(net: LayerProtocol, loss: Loss, input_shape: Shape, *, batch: int = 4, seed: int = 0) -> LayerReport:
    """Check every derivative quantity of ``net`` under ``loss`` against JAX autodiff, end to end, in float64.

    Arguments:
        net: any network (a layer, combinators and a user's layers included).
        loss: one of :mod:`mnet.losses` (or any :class:`mnet.losses.Loss`).
        input_shape: one example's shape (no batch axis), as ``init`` takes it.
        batch: examples per random batch (the NTK's second batch has one more).
        seed: seeds the parameters, inputs, targets and directions.

    Returns:
        A :class:`mnet.checking.layer_report.LayerReport` with one row per quantity: ``report.ok``,
        ``report.wrong`` (the quantities that disagree), ``str(report)`` a table, ``report.to_dict()`` plain data.
    """
    require_layer(net, "check_network: the network")
    with jax.enable_x64(True):
        return _check(net, loss, tuple(input_shape), batch, seed)


def _check(net: Any, loss: Loss, input_shape: tuple[int, ...], batch: int, seed: int) -> LayerReport:
    rng = np.random.default_rng(seed)
    params, x, x2, targets, v, dx = _draw(net, loss, input_shape, batch, seed, rng)

    def objective(p):
        return loss.value(call_forward(net, p, x)[0], targets)

    def value_and_grad_ref(p, inputs, t):
        return jax.value_and_grad(objective)(p)

    checks: list[tuple[str, Callable, Callable, tuple]] = [
        ("value_and_grad", value_and_grad(net, loss), value_and_grad_ref, (params, x, targets)),
        (
            "per_example_grads",
            per_example_grads(net, loss),
            reference.per_example_grads(net, loss),
            (params, x, targets),
        ),
        (
            "per_example_grad_norms",
            per_example_grad_norms(net, loss),
            reference.per_example_grad_norms(net, loss),
            (params, x, targets),
        ),
        (
            "ggn_vector_product",
            ggn_vector_product(net, loss),
            reference.ggn_vector_product(net, loss),
            (params, x, targets, v),
        ),
        (
            "hessian_vector_product",
            hessian_vector_product(net, loss),
            reference.hessian_vector_product(net, loss),
            (params, x, targets, v),
        ),
        ("jacobian", jacobian(net), jax.jacrev(lambda p, inputs: call_forward(net, p, inputs)[0]), (params, x)),
        ("ntk", ntk(net), reference.ntk(net), (params, x, x2)),
        ("jvp", jvp(net), reference.jvp(net), (params, x, v, dx)),
        ("diag_ggn", diag_ggn(net, loss), reference.diag_ggn(net, loss), (params, x, targets)),
        (
            "per_example_diag_ggn",
            per_example_diag_ggn(net, loss),
            reference.per_example_diag_ggn(net, loss),
            (params, x, targets),
        ),
    ]
    order = {name: k for k, name in enumerate(QUANTITIES)}
    checks.sort(key=lambda check: order[check[0]])
    rows = compared_rows(
        [Check(name, "driver", hand, ref, arguments) for name, hand, ref, arguments in checks],
        (MnetError,),
        lambda unsupported: " ".join(str(unsupported).split()),
    )
    rows.append(_diag_hessian_row(net, loss, params, x, targets, objective, rng))
    rows.append(_kronecker_row(net, loss, params, x, targets))
    return LayerReport(repr(net), input_shape, batch, tuple(rows), title=f"check_network {net!r}, loss {loss!r}")


def _draw(net: Any, loss: Loss, input_shape: tuple[int, ...], batch: int, seed: int, rng: np.random.Generator):
    """Parameters moved off their initial values, two batches, targets the loss accepts, and directions."""
    _, params = init_layer(net, jax.random.key(seed), input_shape, jnp.float64)
    params = perturbed(params, rng)
    x, x2 = (random_input(net, (n,) + input_shape, rng) for n in (batch, batch + 1))
    outputs = jax.eval_shape(lambda p, inputs: call_forward(net, p, inputs)[0], params, x)
    targets = loss.random_targets(outputs, jax.random.key(seed + 1))
    v = jax.tree_util.tree_map(lambda p: _normal(rng, p) if _floating(p) else jnp.zeros_like(p), params)
    return params, x, x2, targets, v, _normal(rng, x) if _floating(x) else None


def _diag_hessian_row(net, loss, params, x, targets, objective, rng) -> RuleRow:
    try:
        mine = jax.flatten_util.ravel_pytree(jax.jit(diag_hessian(net, loss))(params, x, targets))[0]
    except MnetError as unsupported:
        return RuleRow("diag_hessian", "absent", note=" ".join(str(unsupported).split()))
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    coordinates, note = np.arange(flat.size), ""
    if flat.size > reference.DIAG_HESSIAN_COORDINATES:
        coordinates = np.sort(rng.choice(flat.size, reference.DIAG_HESSIAN_COORDINATES, replace=False))
        note = f"{reference.DIAG_HESSIAN_COORDINATES} of {flat.size} coordinates, at random"
    ref = jax.jit(lambda theta, idx: reference.hessian_diagonal(lambda t: objective(unravel(t)), theta, idx))(
        flat, jnp.asarray(coordinates)
    )
    row = compare_rule("diag_hessian", "driver", mine[coordinates], ref)
    return RuleRow(row.rule, row.source, row.agreement, row.worst, note) if note and row.ok else row


def _kronecker_row(net, loss, params, x, targets) -> RuleRow:
    one, t1 = x[:1], targets[:1]
    try:
        S = loss.hessian_sqrt(call_forward(net, params, one)[0], t1)
    except MnetError as unsupported:
        return RuleRow("kfac_factors", "absent", note=" ".join(str(unsupported).split()))
    H = jax.jit(lambda p: reference.output_hessians(net, loss, p, one, t1)[0])(params)
    factors = kfac_factors(net, loss)
    return kronecker_comparison("kfac_factors", "driver", net, params, one, S, H, lambda p: factors(p, one, t1))


def _leaves(tree: Any) -> list:
    return jax.tree_util.tree_leaves(tree)


def _floating(a: Any) -> bool:
    return jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)


def _normal(rng: np.random.Generator, like: Any) -> jax.Array:
    return jnp.asarray(rng.normal(size=np.shape(like)), jnp.asarray(like).dtype)
