"""``mnet.laplace(...)``: the fit (one forward pass and one walk per chunk of the data: the GGN diagonal, or the
Kronecker factors with their positions) and the ``Laplace`` it returns."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from mnet.core.chunks import chunks
from mnet.core.protocol import Array, LayerProtocol, Params, call_forward
from mnet.core.walk import walk
from mnet.errors import SettingError
from mnet.laplace.posterior import Laplace
from mnet.laplace.structure import STRUCTURES, chunk_of, is_entry, positive
from mnet.laplace.subset import SUBSETS, split_last_layer
from mnet.losses import Loss, with_mask
from mnet.quantities.ggn import check_samples, loss_square_root, summed_diag_ggn
from mnet.quantities.kronecker import GGNBlockFactors, eigen_block, is_factor_pair


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 8))
def fit_chunk(net, loss, structure, mc_samples, params, x, targets, key, sigma, mask=None):
    """One chunk's summed negative log-likelihood, summed GGN diagonal of the negative log-likelihood, and (for
    ``"kron"``) its factors with positions folded in (means over the chunk's positions). Each example's loss
    Hessian square root is scaled by ``sqrt(w_b)`` of :meth:`mnet.losses.Loss.likelihood_weights`, so that a
    sequence counts each labelled position once, however many it has. A padding ``mask`` reaches the network's
    attention and the loss (:func:`mnet.losses.with_mask`), so padded positions count for nothing."""
    loss, targets = with_mask(loss, targets, mask)
    outputs, cache = call_forward(net, params, x, mask=mask)
    weights, constant = loss.likelihood_weights(outputs, targets, sigma)
    nll = jnp.sum(weights * loss.per_example(outputs, targets)) + x.shape[0] * constant
    S = loss_square_root(loss, outputs, targets, mc_samples, key)
    S = S * jnp.sqrt(weights).reshape((1, -1) + (1,) * (S.ndim - 2)).astype(S.dtype)
    diagonal = summed_diag_ggn(net, params, x, cache, S, mask)
    factors = walk(net, GGNBlockFactors(kept=mask), params, (cache,), (S,))[0] if structure == "kron" else None
    return nll, diagonal, factors


def laplace(
    net: LayerProtocol,
    loss: Loss,
    params: Params,
    x: Array,
    targets: Array,
    *,
    structure: str = "diag",
    prior_precision: float = 1.0,
    sigma_noise: float = 1.0,
    mc_samples: int | None = None,
    key: Array | None = None,
    batch_size: int = 256,
    subset: str = "all",
    mask: Array | None = None,
) -> Laplace:
    """Fit a Laplace approximation around trained parameters ``params`` on the training data ``(x, targets)``.

    Arguments:
        net, loss: the network and the loss it was trained with (softmax or sigmoid cross-entropy for
            classification, the mean squared error for regression: the likelihood follows from the loss).
        params: the trained parameters ``theta*`` (ideally a maximum of the posterior: trained with weight decay
            ``alpha / N`` per example, or long enough).
        x, targets: the training data, all ``N`` examples (processed ``batch_size`` at a time).
        structure: ``"diag"`` (diagonal GGN) or ``"kron"`` (Kronecker factors per dense-like layer, the diagonal
            for layers without them).
        prior_precision: ``alpha`` of the prior ``N(0, alpha^-1 I)``; fit it with
            :meth:`Laplace.optimize_prior_precision`.
        sigma_noise: the Gaussian noise's standard deviation (regression only).
        mc_samples: None (default) for the exact GGN (``C`` backward columns per example), or ``S`` to estimate
            it from ``S`` draws per example from the model's predictive distribution (needs ``key``).
        key: the PRNG key for ``mc_samples``.
        batch_size: examples per compiled call of the fit.
        subset: ``"all"`` weights, or ``"last_layer"``: the posterior over the last layer with parameters of a
            :func:`mnet.serial` alone, the layers before it frozen at ``params`` as a feature map (the returned
            Laplace's ``params`` are then that layer's, and every method takes the network's own inputs).
        mask: a padding mask, ``(N, T)`` booleans (True at tokens), for a model that reads one (attention that is not
            causal): it reaches the network and the loss as in every quantity, so a padded position adds nothing to
            the curvature or the likelihood. The predictive methods take the mask of their own inputs.

    A sequence model's likelihood counts every labelled position: with :func:`mnet.losses.softmax_cross_entropy`
    on ``(N, T, vocab)`` logits, ``-log p(t_n) = sum_t l_nt``, the loss's mean over positions times their number
    (padding labelled ``ignore_index`` left out, see :meth:`mnet.losses.Loss.likelihood_weights`).

    Returns:
        A :class:`Laplace`: ``log_marginal_likelihood``, ``optimize_prior_precision``, ``posterior_variance``,
        ``sample``, ``functional_covariance`` and ``predict``.

    Raises:
        ValueError: for an unknown structure, a non-positive precision or noise, a loss with no known
            likelihood, inputs and targets of different lengths, or ``"kron"`` on a network with no
            Kronecker-factored layer.
    """
    if structure not in STRUCTURES:
        raise SettingError(f"laplace: structure must be one of {STRUCTURES}, got {structure!r}")
    if subset not in SUBSETS:
        raise SettingError(f"laplace: subset must be one of {SUBSETS}, got {subset!r}")
    alpha = positive(prior_precision, "prior_precision")
    sigma = positive(sigma_noise, "sigma_noise")
    loss.likelihood("laplace")
    check_samples(mc_samples)
    if mc_samples is not None and key is None:
        raise SettingError(
            f"laplace(mc_samples={mc_samples}) estimates the GGN by sampling: pass key=jax.random.key(...)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SettingError(f"laplace: batch_size must be a positive int, got {batch_size!r}")
    n = jnp.shape(x)[0] if jnp.ndim(x) else 0
    if n == 0 or jnp.shape(targets)[:1] != (n,):
        raise SettingError(
            f"laplace: x and targets must hold the same number (> 0) of examples, got x {jnp.shape(x)} and "
            f"targets {jnp.shape(targets)}"
        )
    if mask is not None and (jnp.shape(mask)[:1] != (n,) or jnp.asarray(mask).dtype != bool):
        raise SettingError(
            f"laplace: mask must hold one row of booleans per example, {n} in all; got {jnp.asarray(mask).dtype} of "
            f"shape {jnp.shape(mask)}"
        )
    features = None
    if subset == "last_layer":
        features, net, params = split_last_layer(net, params)
    nll, diagonal, factors = 0.0, None, None
    for i, part in enumerate(chunks(n, batch_size)):
        chunk_key = None if key is None else jax.random.fold_in(key, i)
        rows = chunk_of(mask, part)
        inputs = x[part] if features is None else features(x[part], batch_size, rows)  # a chunk's features at a time
        total, diag, kron = fit_chunk(
            net, loss, structure, mc_samples, params, inputs, targets[part], chunk_key, sigma, rows
        )
        size = part.stop - part.start
        nll = nll + total
        diagonal = diag if diagonal is None else jax.tree_util.tree_map(jnp.add, diagonal, diag)
        if structure == "kron":
            weighted = jax.tree_util.tree_map(lambda f, size=size: f * size, kron)
            factors = weighted if factors is None else jax.tree_util.tree_map(jnp.add, factors, weighted)
    entries = None
    if structure == "kron":
        if not any(is_factor_pair(node) for node in jax.tree_util.tree_leaves(factors, is_leaf=is_entry)):
            raise SettingError(f'laplace: {net!r} has no layer with Kronecker factors; use structure="diag"')
        entries = jax.tree_util.tree_map(
            lambda node: eigen_block({k: v / n for k, v in node.items()}, n) if is_factor_pair(node) else node,
            factors,
            is_leaf=is_entry,
        )
    return Laplace(
        net,
        loss,
        params,
        structure,
        diagonal,
        entries,
        prior_precision=alpha,
        sigma_noise=sigma,
        n_data=n,
        log_likelihood=-nll,
        features=features,
    )
