"""Several quantities from one forward pass (BackPACK's extensions, which all ride on one backward): the gradient,
the per-example gradients and their norms, the moments of the per-example gradients and the GGN diagonal, from
one forward pass of the batch and walks that start from the same values.

Every gradient-like quantity walks down from the same per-example cotangents ``c_b = d l_b / d y_b`` (the mean's
gradient is the walk of ``c`` divided by the batch, since backward is linear in its cotangent), and both GGN
diagonals from the same square-root columns. The walks then compute identical cotangents at every layer, which XLA
computes once (common-subexpression elimination on the compiled program), so the call costs one forward pass, the
shared backward chain, and each quantity's own per-layer share: less than the sum of the separate calls, each of
which runs its own forward and backward passes (the test measures it on the compiled program).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mnet.core.protocol import Array, LayerProtocol, Params, call_forward
from mnet.core.walk import BACKWARD, MissingRule
from mnet.errors import SettingError
from mnet.losses import Loss, with_mask
from mnet.quantities.ggn import (
    DIAG_GGN,
    PER_EXAMPLE_DIAG_GGN,
    check_samples,
    diag_ggn,
    loss_square_root,
    per_example_diag_ggn,
)
from mnet.quantities.gradient import grad
from mnet.quantities.gradient_moments import gradient_variance, sum_grad_squared, variance
from mnet.quantities.per_example import (
    PER_EXAMPLE_BACKWARD,
    PER_EXAMPLE_SQ_NORMS,
    per_example_grad_norms,
    per_example_grads,
)

QUANTITIES = (
    "grad",
    "per_example_grads",
    "per_example_grad_norms",
    "sum_grad_squared",
    "gradient_variance",
    "diag_ggn",
    "per_example_diag_ggn",
)


def check_quantities(quantities: Any) -> tuple[str, ...]:
    if isinstance(quantities, str) or not isinstance(quantities, Sequence) or not quantities:
        raise SettingError(
            f"one_pass: quantities must be a non-empty list of names from {QUANTITIES}, got {quantities!r}"
        )
    unknown = [name for name in quantities if name not in QUANTITIES]
    if unknown or len(set(quantities)) != len(quantities):
        raise SettingError(f"one_pass: quantities must be distinct names from {QUANTITIES}, got {list(quantities)!r}")
    return tuple(quantities)


def scaled(tree: Params, factor: float) -> Params:
    return jax.tree_util.tree_map(lambda leaf: leaf * factor, tree)


def walks(net, params, x, cache, c, S, names) -> dict[str, Any]:
    """Every quantity asked for, by its walk from the cotangents ``c`` or the columns ``S``."""
    n = x.shape[0]
    found: dict[str, Any] = {}
    if {"grad", "gradient_variance"} & set(names):
        found["grad"] = scaled(BACKWARD.run(net, params, cache, c)[0], 1 / n)
    if "per_example_grads" in names:
        found["per_example_grads"] = PER_EXAMPLE_BACKWARD.run(net, params, cache, c)[0]
    if "per_example_grad_norms" in names:
        found["per_example_grad_norms"] = jnp.sqrt(PER_EXAMPLE_SQ_NORMS.run(net, params, cache, c)[0])
    if {"sum_grad_squared", "gradient_variance"} & set(names):
        found["sum_grad_squared"] = DIAG_GGN.run(net, params, cache, c[None])[0]
    if "gradient_variance" in names:
        found["gradient_variance"] = variance(found["sum_grad_squared"], found["grad"], n)
    if "diag_ggn" in names:
        found["diag_ggn"] = scaled(DIAG_GGN.run(net, params, cache, S)[0], 1 / n)
    if "per_example_diag_ggn" in names:
        found["per_example_diag_ggn"] = PER_EXAMPLE_DIAG_GGN.run(net, params, cache, S)[0]
    return found


def separately(net, loss, mc_samples, params, x, targets, key, state, mask, names) -> dict[str, Any]:
    """Each quantity by its own driver: for a network with a layer that has no per-example rule, where those
    drivers fall back to one example at a time."""
    drivers: dict[str, Callable[..., Any]] = {
        "grad": grad(net, loss),
        "per_example_grads": per_example_grads(net, loss),
        "per_example_grad_norms": per_example_grad_norms(net, loss),
        "sum_grad_squared": sum_grad_squared(net, loss),
        "gradient_variance": gradient_variance(net, loss),
        "diag_ggn": diag_ggn(net, loss, mc_samples),
        "per_example_diag_ggn": per_example_diag_ggn(net, loss, mc_samples),
    }
    sampled = {"key": key} if mc_samples is not None else {}
    return {
        name: drivers[name](params, x, targets, state=state, mask=mask, **(sampled if "diag_ggn" in name else {}))
        for name in names
    }


def one_pass(
    net: LayerProtocol, loss: Loss, quantities: Sequence[str], *, mc_samples: int | None = None
) -> Callable[..., dict[str, Any]]:
    """``f(params, x, targets[, key=...]) -> {"value": ..., name: ...}``: several quantities from one forward pass
    and walks that share their backward chain (module text).

    Arguments:
        net, loss: any network and loss (a loss with a Hessian square root for the GGN diagonals).
        quantities: names from ``"grad"``, ``"per_example_grads"``, ``"per_example_grad_norms"``,
            ``"sum_grad_squared"``, ``"gradient_variance"``, ``"diag_ggn"``, ``"per_example_diag_ggn"``; each is
            what the public function of that name returns (``mnet.grad``, ``mnet.per_example_grads``, ...).
        mc_samples: for the GGN diagonals, None (exact) or the number of Monte-Carlo draws per example (then ``f``
            needs ``key=``), as :func:`mnet.diag_ggn` takes it.

    Returns:
        ``f(params, x, targets, *, key=None, state=None, mask=None)``, returning a dict with the batch's mean loss
        under ``"value"`` and every quantity asked for under its name.
    """
    names = check_quantities(quantities)
    check_samples(mc_samples)
    curvature = {"diag_ggn", "per_example_diag_ggn"} & set(names)

    def one_pass_fn(
        params: Params,
        x: Array,
        targets: Array,
        *,
        key: Array | None = None,
        state: Any = None,
        mask: Array | None = None,
    ) -> dict[str, Any]:
        masked_loss, masked_targets = with_mask(loss, targets, mask)
        outputs, cache = call_forward(net, params, x, state=state, mask=mask)
        c = masked_loss.per_example_grad(outputs, masked_targets)
        S = loss_square_root(masked_loss, outputs, masked_targets, mc_samples, key) if curvature else None
        try:
            found = walks(net, params, x, cache, c, S, names)
        except MissingRule:
            found = separately(net, loss, mc_samples, params, x, targets, key, state, mask, names)
        return {"value": masked_loss.value(outputs, masked_targets), **{name: found[name] for name in names}}

    return one_pass_fn
