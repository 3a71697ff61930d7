"""K-FAC's direction by hand: every dense-like layer's gradient ``dW'`` preconditioned by its damped Kronecker
factors' inverses, ``A^-1 dW' G^-1``, in whichever of two exact forms costs less.

Derivation. For a dense layer ``z = a W'`` (``a = [x, 1]``, ``W' = [W; b]``, positions as rows) the gradient of the
mean loss is ``dW' = a^T dZ``, ``dZ`` the loss gradient carried back to ``z``. The inverses are symmetric, so

    A^-1 dW' G^-1 = A^-1 a^T dZ G^-1 = (a A^-1)^T (dZ G^-1).

The dense form (``precondition``) multiplies the gradient by both inverses: ``n_in n_out (n_in + n_out)``
multiply-adds besides the gradient's own ``rows n_in n_out``. The factored form multiplies the operands first:
``rows (n_in^2 + n_out^2 + n_in n_out)``. With ``rows`` (the batch) below the layer's widths, as in an MLP at batch
128 (785 x 512: 3.4 gradients for the dense form, 1.06 for the factored), the factored form is cheaper, and it
never builds the gradient; with many positions (a convolution's windows) the dense form is. Each layer's rule
chooses from the static shapes (:func:`mnet.core.sums.factored_preconditioned_gradient`).

The walk. The factored form needs each layer's input and output cotangent, which only the gradient's walk has: the
direction is that walk (:class:`KroneckerDirection`), every unit's share its direction (or its plain gradient where
it has no Kronecker structure). The inverses reach the units in the order the walk visits them, as EK-FAC's bases do
(:func:`mnet.quantities.ekfac.bases_in_visit_order`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from mnet.core.protocol import Array, LayerProtocol, Params, call_forward, has_params
from mnet.core.sums import tree_vdot
from mnet.core.walk import Backward, own_rule, walk
from mnet.losses import Loss, with_mask
from mnet.quantities.ekfac import bases_in_visit_order
from mnet.quantities.kronecker import is_factor_pair, stack_bias, unstack_bias


def precondition(inverses: Any, grads: Params) -> Params:
    """The dense form: every dense-like entry's gradient ``[W; b]`` replaced by ``A^-1 [W; b] G^-1`` (``inverses``
    a tree like :func:`mnet.kfac_factors`' result with the damped inverses); the rest unchanged."""
    if is_factor_pair(inverses):
        return unstack_bias(inverses["A"] @ stack_bias(grads) @ inverses["G"], grads)
    if inverses is None or inverses == ():
        return grads
    if isinstance(inverses, dict):
        return {name: precondition(inverses[name], grads[name]) for name in grads}
    return type(grads)(precondition(inv, g) for inv, g in zip(inverses, grads))


class KroneckerDirection(Backward):
    """The gradient's walk with every unit's share preconditioned by its inverses (a list in visit order, None where a
    unit has none): by the unit's ``kronecker_direction(params, cache, dz, inverses)`` rule where it returns the
    factored form ``(direction, <direction, gradient>)``, else by :func:`precondition` of the unit's gradient.
    Where the factored form is taken the unit's gradient is computed by its ``backward`` but never read, and a
    jitted program leaves it out. ``quadratic`` sums ``<direction, gradient>`` over the units."""

    # ``rule`` stays the gradient's: every unit's backward runs as in the gradient's walk.
    direction_rule = "kronecker_direction"

    def __init__(self, inverses: list[Any]):
        self.inverses, self.visits = inverses, 0
        self.quadratic: Any = 0.0

    def at_unit(self, layer, params, caches, carried):
        grads, down = super().at_unit(layer, params, caches, carried)
        if not has_params(params):
            return grads, down
        inverse = self.inverses[self.visits]
        self.visits += 1
        own = own_rule(layer, self.direction_rule)
        factored = own(params, caches[0], carried[0], inverse) if own is not None and is_factor_pair(inverse) else None
        if factored is not None:
            self.quadratic = self.quadratic + factored[1]
            return unstack_bias(factored[0], params), down
        direction = precondition(inverse, grads)
        self.quadratic = self.quadratic + tree_vdot(direction, grads)
        return direction, down

    def tie(self, layer, first, second):
        """A matrix used twice has no inverses (:meth:`mnet.quantities.kronecker.KroneckerFactors.tie`), so both
        uses' shares are its plain gradients ``g1, g2``: the entry is ``g1 + g2``, and the quadratic form, which
        counted ``<g1, g1> + <g2, g2>``, gains the cross term ``2 <g1, g2>``."""
        self.quadratic = self.quadratic + 2 * tree_vdot(first, second)
        return super().tie(layer, first, second)


def kfac_direction(net: LayerProtocol, loss: Loss) -> Callable[..., tuple[Array, Params, Array]]:
    """``f(params, x, targets, inverses, *, state=None, mask=None) -> (loss value, direction, quadratic)``:
    K-FAC's direction for the batch's mean loss, every dense-like entry ``A^-1 dW' G^-1`` (the gradient elsewhere),
    and ``quadratic = <direction, gradient>`` (what K-FAC's KL clipping bounds), by one forward pass and one walk of
    the loss gradient, without building the gradient of any layer where the factored form
    ``([X, 1] A^-1)^T (dZ G^-1)`` is the cheaper (see the module docstring).

    Arguments:
        net, loss: the network and its loss.

    The function takes ``inverses``, a tree like :func:`mnet.kfac_factors`' result holding each entry's damped
    inverses ``{"A": A^-1, "G": G^-1}`` (symmetric; None or ``()`` elsewhere), and the batch's padding ``mask``
    (``(batch, T)``, True at tokens) as the gradient does.

    Returns:
        The function; ``direction`` is a tree like ``params``, equal (up to rounding) to
        ``precondition(inverses, grads)`` for the batch's hand-derived gradient ``grads``.
    """

    def kfac_direction_fn(
        params: Params, x: Array, targets: Array, inverses: Any, *, state: Any = None, mask: Array | None = None
    ) -> tuple[Array, Params, Array]:
        masked_loss, targets = with_mask(loss, targets, mask)
        outputs, cache = call_forward(net, params, x, state=state, mask=mask)
        dy = masked_loss.grad(outputs, targets)
        quantity = KroneckerDirection(bases_in_visit_order(net, params, x, dy[None], inverses))
        direction, _ = walk(net, quantity, params, (cache,), (dy,))
        return masked_loss.value(outputs, targets), direction, jnp.asarray(quantity.quadratic, outputs.dtype)

    return kfac_direction_fn
