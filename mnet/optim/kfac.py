"""K-FAC: natural-gradient steps preconditioned by every dense layer's Kronecker factors, as an optax transformation.

For a dense layer ``z = a W'`` (``a`` the input with a 1 appended, ``W' = [W; b]``), :func:`mnet.kfac_factors` gives
``A = mean a a^T`` and ``G = mean S S^T`` with ``kron(A, G)`` approximating the layer's block of the GGN (Martens and
Grosse 2015). The block's inverse applied to the gradient is two small solves, never the block itself:

    (A kron G)^-1 vec(dW') = vec(A^-1 dW' G^-1).

The preconditioner keeps, in a plain pytree state:

* the factors averaged over steps, ``F <- decay F + (1 - decay) F_batch`` (the first step takes ``F_batch``),
  computed every ``factors_every`` steps (step 0 included; every step by default) and held in between, as PyTorch's
  K-FAC (``factor_update_steps``) does: at a small batch the factors cost as much as the gradient again, and the
  curvature moves slowly;
* their damped inverses, refreshed every ``inverse_every`` steps (step 0 included) and reused in between. Damping is
  factored Tikhonov damping: ``A + pi sqrt(damping) I`` and ``G + sqrt(damping) / pi I`` with
  ``pi = sqrt((tr A / dim A) / (tr G / dim G))``, which keeps ``kron`` of the damped factors within a factor of two
  of ``kron(A, G) + damping I`` (Martens and Grosse, section 6.3); ``pi_correction=False`` uses ``pi = 1``.

When the update is told that ``grads`` are the batch's own gradient (``batch_gradient=True``, as :func:`mnet.fit`
says), the direction is computed from the gradient's operands instead, ``(a A^-1)^T (dZ G^-1)`` for ``dW' = a^T dZ``,
wherever that is the cheaper (:mod:`mnet.quantities.kfac_direction`): the solves then cost 1.06 gradients instead of
3.4 on an MLP's 785 x 512 layer at batch 128, and the layer's gradient is never built.

A layer without Kronecker structure (LayerNorm, Embedding, a user's layer without a rule) keeps its plain gradient.
Every step computes the batch's factors by hand (one forward pass and one walk of the loss Hessian's square root:
:func:`mnet.kfac_factors`), so the transformation needs the batch: it is an
``optax.GradientTransformationExtraArgs`` whose ``update`` takes ``inputs=``, ``targets=`` and (for
``kind="kfac"``) ``key=``, which :func:`mnet.fit` passes to any such transformation. Chain it with any optax
transformation that turns a direction into a step: :func:`kfac` is ``optax.chain(preconditioner, sgd with momentum)``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mnet.core.protocol import Array, LayerProtocol, Params, call_forward, has_params
from mnet.core.protocol import input_dtype as network_input_dtype
from mnet.core.sums import tree_vdot
from mnet.core.walk import walk
from mnet.errors import SettingError
from mnet.losses import Loss
from mnet.optim.inverse import spd_inverse
from mnet.quantities.ekfac import eigen_correction, eigenbases, eigenbasis_solve
from mnet.quantities.kfac_direction import kfac_direction, precondition
from mnet.quantities.kronecker import (
    KRONECKER_FACTORS,
    KRONECKER_KINDS,
    is_factor_pair,
    kfac_factors,
    stack_bias,
    unstack_bias,
)


class KFACState(NamedTuple):
    """The preconditioner's state: the step count, the averaged factors and their damped inverses (trees like
    :func:`mnet.kfac_factors`' result: ``{"A", "G"}`` per dense-like entry, ``()`` or None elsewhere). For EK-FAC
    (``eigenvalue_correction=True``) ``inverses`` holds the factors' eigenbases ``{"A": Q_A, "G": Q_G}`` instead, and
    ``scales`` the corrected eigenvalues ``S`` per entry (None for K-FAC)."""

    step: Array
    factors: Any
    inverses: Any
    scales: Any = None


def _map_pairs(fn, *trees: Any) -> Any:
    """``fn`` on every ``{"A", "G"}`` entry of ``trees`` (zipped), the rest of the structure kept."""
    return jax.tree_util.tree_map(fn, *trees, is_leaf=lambda node: is_factor_pair(node) or node is None)


def _damped_inverses(pair: dict, damping: float, pi_correction: bool) -> dict:
    A, G = pair["A"], pair["G"]
    if pi_correction:
        ratio = (jnp.trace(A) / A.shape[0]) / (jnp.trace(G) / G.shape[0])
        pi = jnp.sqrt(jnp.where(ratio > 0, ratio, 1.0))
    else:
        pi = jnp.ones((), A.dtype)
    root = jnp.sqrt(jnp.asarray(damping, A.dtype))

    def inverse(M: Array, shift: Array) -> Array:
        # Products in XLA rather than LAPACK's Cholesky, whose OpenBLAS threads compete with XLA's on a CPU
        return spd_inverse(M + shift * jnp.eye(M.shape[0], dtype=M.dtype))

    return {"A": inverse(A, pi * root), "G": inverse(G, root / pi)}


def precondition_in_eigenbases(bases: Any, scales: Any, grads: Params, damping: float) -> Params:
    """EK-FAC's direction: every dense-like entry's ``[W; b]`` solved in its eigenbasis with the corrected
    eigenvalues (:func:`mnet.quantities.ekfac.eigenbasis_solve`); the rest unchanged."""
    if is_factor_pair(bases):
        return unstack_bias(eigenbasis_solve(bases["A"], bases["G"], scales, stack_bias(grads), damping), grads)
    if bases is None or bases == ():
        return grads
    if isinstance(bases, dict):
        return {name: precondition_in_eigenbases(bases[name], scales[name], grads[name], damping) for name in grads}
    return type(grads)(precondition_in_eigenbases(b, s, g, damping) for b, s, g in zip(bases, scales, grads))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_settings(damping: float, decay: float, inverse_every: int, factors_every: int, kind: str) -> None:
    if not (_is_number(damping) and damping > 0):
        raise SettingError(f"kfac: damping must be > 0 (it keeps the factors invertible), got {damping!r}")
    if not (_is_number(decay) and 0 <= decay < 1):
        raise SettingError(f"kfac: decay must be in [0, 1) (the weight kept by the moving average), got {decay!r}")
    if not (isinstance(inverse_every, int) and inverse_every >= 1):
        raise SettingError(f"kfac: inverse_every must be a positive int, got {inverse_every!r}")
    if not (isinstance(factors_every, int) and factors_every >= 1):
        raise SettingError(f"kfac: factors_every must be a positive int, got {factors_every!r}")
    if inverse_every % factors_every:
        # a refresh between two factor updates would invert factors it has already inverted
        raise SettingError(
            f"kfac: inverse_every ({inverse_every}) must be a multiple of factors_every ({factors_every}), so that "
            "every refresh of the inverses follows fresh factors"
        )
    if kind not in KRONECKER_KINDS:
        raise SettingError(f"kfac: kind must be one of {KRONECKER_KINDS}, got {kind!r}")


def _factor_shapes(net: LayerProtocol, input_shape: tuple[int, ...], input_dtype: Any, params: Params) -> Any:
    """The factors' structure and shapes from the network's walk at a batch of one (no computation)."""
    dtype = input_dtype or network_input_dtype(net, params)

    def factors_of_one(p):
        x = jnp.zeros((1,) + tuple(input_shape), dtype)
        outputs, cache = call_forward(net, p, x)
        return walk(net, KRONECKER_FACTORS, p, (cache,), (jnp.zeros((1,) + outputs.shape, outputs.dtype),))[0]

    return jax.eval_shape(factors_of_one, params)


def _zero_factors(structure: Any) -> Any:
    return _map_pairs(
        lambda pair: {k: jnp.zeros(v.shape, v.dtype) for k, v in pair.items()} if is_factor_pair(pair) else pair,
        structure,
    )


def _when(condition: Array, compute: Any, held: Any, period: int) -> Any:
    """``compute()`` on the steps where ``condition`` holds, else ``held``; with ``period == 1`` it always holds, and
    the program carries no conditional (an untaken ``lax.cond`` still copies what it holds)."""
    return compute() if period == 1 else jax.lax.cond(condition, compute, lambda: held)


def _dense_or_factored(
    direction_fn, inverses: Any, grads: Params, params: Params, factored, extra: dict
) -> tuple[Params, Any]:
    """K-FAC's direction in the form ``factored`` asks for (see :func:`kfac_preconditioner`) and ``<direction,
    gradient>``, the quadratic form ``kl_clip`` bounds; a factored form asked for on an update not told that
    ``grads`` are the batch's gradient is refused, since it would not read them."""
    batch_gradient = extra.get("batch_gradient") is True
    if factored and not batch_gradient:
        raise SettingError(
            "kfac: factored=True computes the batch's own gradient in factored form, so update must be told that grads "
            "are that gradient (batch_gradient=True); mnet.fit tells it for grad='manual' without dropout or row "
            "weights"
        )
    if not (batch_gradient if factored is None else factored):
        direction = precondition(inverses, grads)
        return direction, tree_vdot(direction, grads)
    _, direction, quadratic = direction_fn(params, extra["inputs"], extra["targets"], inverses, mask=extra.get("mask"))
    return direction, quadratic


def _kl_clipped(direction: Params, quadratic: Array, kl_clip: float, learning_rate: float) -> Params:
    """Ba et al. (2017): the direction shrunk (never grown) so that the step's quadratic form under the curvature,
    ``lr^2 <direction, F direction> ~ lr^2 <direction, grads>`` (``quadratic``), stays below ``kl_clip``."""
    scale = jnp.minimum(1.0, jnp.sqrt(kl_clip / jnp.maximum(learning_rate**2 * quadratic, 1e-30)))
    return jax.tree_util.tree_map(lambda d: d * scale.astype(d.dtype), direction)


def kfac_preconditioner(
    net: LayerProtocol,
    loss: Loss,
    input_shape: tuple[int, ...],
    *,
    damping: float = 1e-2,
    decay: float = 0.95,
    inverse_every: int = 10,
    factors_every: int = 1,
    kind: str = "kfac",
    pi_correction: bool = True,
    kl_clip: float | None = None,
    learning_rate: float = 1.0,
    input_dtype: Any = None,
    eigenvalue_correction: bool = False,
    factored: bool | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The K-FAC preconditioner: gradients in, natural-gradient directions out (chain it with a step rule).

    With ``eigenvalue_correction=True`` it is EK-FAC (George et al. 2018): every ``inverse_every`` steps the
    averaged factors' eigenbases are taken (``eigh``), and every step the batch's corrected eigenvalues in the bases
    held (:func:`mnet.eigen_correction`, from the same columns as the factors) are averaged with the same ``decay``
    (restarted from the batch's at each refresh, since the old ones belong to the old bases); the direction is
    ``Q_A ((Q_A^T dW' Q_G) / (S + damping)) Q_G^T``, damped by ``damping`` itself (no factored damping).

    Arguments:
        net, loss: the network and loss being trained.
        input_shape: one example's shape (no batch axis), as ``net.init`` takes it: the factors' sizes follow.
        damping: Tikhonov damping ``lambda > 0`` (factored; see the module docstring).
        decay: weight kept by the factors' moving average per step.
        inverse_every: steps between refreshes of the damped inverses (a multiple of ``factors_every``).
        factors_every: steps between computations of the batch's factors (and, for EK-FAC, its corrected
            eigenvalues); the moving average takes one ``decay`` per computation. Between them a step costs the
            preconditioning alone.
        kind: ``"kfac"`` (one sampled column of the loss Hessian's square root per example: cheap, needs
            ``key=`` in ``update``), ``"kflr"`` (the exact square root: ``C`` columns) or ``"empirical"`` (each
            example's gradient at its label: the empirical Fisher).
        pi_correction: split the damping between the factors by their mean eigenvalues.
        kl_clip: if given, every direction is scaled down (never up) so that ``learning_rate^2 <direction,
            grads>`` (the step's quadratic form under the curvature) is at most ``kl_clip`` (Ba et al. 2017).
        learning_rate: the step rule's learning rate, used by ``kl_clip`` alone.
        input_dtype: the inputs' dtype (default: int32 token ids for a network that starts with an embedding, else
            the parameters' float dtype).
        eigenvalue_correction: EK-FAC instead of K-FAC (see above).
        factored: how the damped inverses reach the gradient. ``False``: the dense form ``A^-1 dW' G^-1`` of the
            given ``grads``. ``True``: the batch's own direction by hand (:func:`mnet.quantities.kfac_direction.
            kfac_direction`: one forward pass and one walk of the loss gradient), each dense-like layer's as
            ``([X, 1] A^-1)^T (dZ G^-1)`` where that costs less (a batch narrower than the layer: 1.06 gradients
            against 3.4 for an MLP's 785 x 512 layer at batch 128); the given ``grads`` are then not read (KL
            clipping's quadratic form comes from the same operands), so they must be the gradient of the batch's
            mean loss, and ``update`` must be told so with ``batch_gradient=True`` (:func:`mnet.fit` says so for
            ``grad="manual"``, :func:`mnet.training.make_step` with ``batch_gradient=True``, both only on steps
            without dropout or row weights). ``None`` (the default): factored
            on the updates told ``batch_gradient=True``, dense on the others. K-FAC only: EK-FAC's direction
            rotates the gradient itself.

    Returns:
        An ``optax.GradientTransformationExtraArgs``; ``update(grads, state, params, *, inputs, targets,
        key=None)``. Its state is a :class:`KFACState`, a plain pytree (checkpoints save it like any optimizer's).

    Raises:
        ValueError: for a bad setting, or (at ``init``) a network without any Kronecker-factored layer.
    """
    _check_settings(damping, decay, inverse_every, factors_every, kind)
    if factored is not None and not isinstance(factored, bool):
        raise SettingError(f"kfac: factored must be True, False or None, got {factored!r}")
    if factored and eigenvalue_correction:
        raise SettingError(
            "kfac: factored=True has no form for EK-FAC (eigenvalue_correction=True), whose direction rotates the "
            "gradient itself"
        )
    factors_fn = kfac_factors(net, loss, kind)
    correction_fn = eigen_correction(net, loss, kind)
    direction_fn = kfac_direction(net, loss)

    def init(params: Params) -> KFACState:
        if not has_params(params):
            raise SettingError(f"kfac: {net!r} has no parameters, so there is nothing to precondition")
        structure = _factor_shapes(net, input_shape, input_dtype, params)
        if not any(is_factor_pair(n) for n in jax.tree_util.tree_leaves(structure, is_leaf=is_factor_pair)):
            raise SettingError(
                f"kfac: {net!r} has no layer with Kronecker factors (Dense, Conv2D, attention projections), so "
                "there is nothing to precondition"
            )
        # Two sets of buffers, since fit donates the state.
        if not eigenvalue_correction:
            return KFACState(jnp.zeros((), jnp.int32), _zero_factors(structure), _zero_factors(structure))
        scales = _map_pairs(
            lambda pair: (
                jnp.zeros((pair["A"].shape[0], pair["G"].shape[0]), pair["A"].dtype) if is_factor_pair(pair) else pair
            ),
            structure,
        )
        return KFACState(jnp.zeros((), jnp.int32), _zero_factors(structure), _zero_factors(structure), scales)

    def update(grads: Params, state: KFACState, params: Params | None = None, **extra: Any):
        if params is None or "inputs" not in extra or "targets" not in extra:
            raise SettingError(
                "kfac: update needs params and the batch: update(grads, state, params, inputs=x, targets=y)"
            )
        key = extra.get("key")
        if kind == "kfac" and key is None:
            raise SettingError('kfac: kind="kfac" samples the loss Hessian\'s square root: pass key= to update')
        inputs, targets, mask = extra["inputs"], extra["targets"], extra.get("mask")
        fresh = state.step % factors_every == 0
        refresh = state.step % inverse_every == 0

        def averaged_factors() -> Any:
            batch = factors_fn(params, inputs, targets, key=key, mask=mask)
            kept = jnp.where(state.step == 0, 0.0, decay)
            return _map_pairs(
                lambda old, new: (
                    old if not is_factor_pair(old) else {k: kept * old[k] + (1 - kept) * new[k] for k in old}
                ),
                state.factors,
                batch,
            )

        factors = _when(fresh, averaged_factors, state.factors, factors_every)
        if eigenvalue_correction:
            bases = _when(refresh, lambda: eigenbases(factors), state.inverses, inverse_every)

            def averaged_scales() -> Any:
                batch_scales = correction_fn(params, inputs, targets, bases, key=key, mask=mask)
                kept_scales = jnp.where(refresh, 0.0, decay)
                return _map_pairs(
                    lambda old, new, basis: (
                        new if not is_factor_pair(basis) else kept_scales * old + (1 - kept_scales) * new
                    ),
                    state.scales,
                    batch_scales,
                    bases,
                )

            scales = _when(fresh, averaged_scales, state.scales, factors_every)
            direction = precondition_in_eigenbases(bases, scales, grads, damping)
            inverses, quadratic = bases, tree_vdot(direction, grads)
        else:
            inverses = _when(
                refresh,
                lambda: _map_pairs(
                    lambda pair: _damped_inverses(pair, damping, pi_correction) if is_factor_pair(pair) else pair,
                    factors,
                ),
                state.inverses,
                inverse_every,
            )
            (direction, quadratic), scales = (
                _dense_or_factored(direction_fn, inverses, grads, params, factored, extra),
                None,
            )
        if kl_clip is not None:
            direction = _kl_clipped(direction, quadratic, kl_clip, learning_rate)
        return direction, KFACState(state.step + 1, factors, inverses, scales)

    return optax.GradientTransformationExtraArgs(init, update)


def kfac(
    net: LayerProtocol,
    loss: Loss,
    input_shape: tuple[int, ...],
    *,
    learning_rate: float = 0.05,
    momentum: float = 0.5,
    kl_clip: float | None = 1e-3,
    **preconditioner: Any,
) -> optax.GradientTransformationExtraArgs:
    """A K-FAC optimizer for :func:`mnet.fit`: :func:`kfac_preconditioner` then SGD with momentum.

    Arguments:
        net, loss, input_shape: as :func:`kfac_preconditioner`.
        learning_rate, momentum: the step along the natural-gradient direction.
        kl_clip: bounds every step's quadratic form (see :func:`kfac_preconditioner`); None switches it off.
        **preconditioner: ``damping``, ``decay``, ``inverse_every``, ``factors_every``, ``kind``, ``pi_correction``,
            ``input_dtype``, ``eigenvalue_correction`` (True for EK-FAC).

    Returns:
        ``optax.chain(kfac_preconditioner(...), optax.sgd(learning_rate, momentum))``; to use another step rule,
        chain :func:`kfac_preconditioner` yourself.
    """
    if not (_is_number(learning_rate) and learning_rate > 0):
        raise SettingError(f"kfac: learning_rate must be > 0, got {learning_rate!r}")
    return optax.chain(
        kfac_preconditioner(net, loss, input_shape, kl_clip=kl_clip, learning_rate=learning_rate, **preconditioner),
        optax.sgd(learning_rate, momentum=momentum),
    )
