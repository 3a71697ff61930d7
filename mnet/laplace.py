"""The Laplace approximation: a Gaussian posterior around trained parameters, from the hand-derived curvature.

Model. The data ``D = {(x_n, t_n)}``, ``n = 1..N``, have the likelihood the loss stands for,
``-log p(t_n | f(x_n; theta)) = s * l_n + c`` (``l_n`` the loss's per-example value): the softmax cross-entropy is
the categorical likelihood (``s = 1``), the sigmoid binary cross-entropy the Bernoulli one per output unit
(``s = U``, the number of units, since mnet averages over them), and the mean squared error a Gaussian with noise
``sigma`` (``s = U / (2 sigma^2)``, ``c = U/2 log(2 pi sigma^2)``). The prior is isotropic,
``theta ~ N(0, alpha^-1 I)`` with precision ``alpha``. Around the trained parameters ``theta*`` the log posterior
is approximated to second order with the Gauss-Newton matrix in place of the Hessian:

    posterior = N(theta*, Lambda^-1),    Lambda = s N GGN + alpha I,

``GGN = mean_n J_n^T H_n J_n`` (:mod:`mnet.curvature`). ``structure`` chooses the approximation of ``GGN``:

* ``"diag"``: its diagonal (:func:`mnet.diag_ggn`), so ``Lambda`` is diagonal. Memory is O(parameters) whatever
  the number of outputs: the walk carries the loss Hessian's square-root columns down the activations, never a
  per-output Jacobian.
* ``"kron"``: per dense-like layer (Dense, Conv2D, attention's projections) ``GGN_block = P kron(A, G)`` from
  :func:`mnet.kfac_factors` (``P`` the layer's output positions: 1 for a flat input, ``T`` for a sequence,
  ``H W`` for a convolution's windows), other layers (LayerNorm, Embedding, a user's layer without a Kronecker
  rule) their diagonal. With eigendecompositions ``A = U diag(a) U^T`` and ``G = V diag(g) V^T`` the block of
  ``Lambda`` is ``(U kron V) diag(s N P a_i g_j + alpha) (U kron V)^T``, which every operation below uses
  without forming it. A block's parameter is ``[W; b]`` (the bias as the last row), a matrix ``M``; ``kron``
  acts on it as ``A M G``.

The eigenvalues ``lambda_k`` of ``s N GGN`` (the diagonal itself, or the products ``s N P a_i g_j``) give, for any
``alpha``, the log marginal likelihood (the evidence) of the Laplace approximation,

    log p(D | alpha) = log p(D | theta*) - alpha/2 |theta*|^2 + P/2 log alpha - 1/2 sum_k log(lambda_k + alpha),

(``P`` here the number of parameters; the ``2 pi`` of prior and posterior cancel) and its derivative
``d/d alpha = -|theta*|^2 / 2 + 1/2 sum_k lambda_k / (alpha (lambda_k + alpha))``, which falls from positive to
``-|theta*|^2 / 2``: the evidence is unimodal in ``alpha`` and :meth:`Laplace.optimize_prior_precision` finds its
maximum by bisection on the derivative's sign in ``log alpha``. On a linear model with a Gaussian likelihood
every step is exact (the GGN is the Hessian, K-FLR's factors are exact) and this is the exact evidence of Bayesian
linear regression.

Predictive (the linearised model, "GLM"): ``f(x; theta) ~ f(x; theta*) + J(x) (theta - theta*)``, so the outputs
are Gaussian with mean ``f(x; theta*)`` and covariance ``J(x) Lambda^-1 J(x)^T`` (``K x K`` per example). A walk
carrying one cotangent per output (as the NTK's does) computes it: every layer takes its own block of the
per-example Jacobian and contracts it against its block of ``Lambda^-1`` at once, so the whole Jacobian never
exists (:class:`_FunctionCovariance`). Classification turns it into probabilities by the probit
approximation, ``softmax(f / sqrt(1 + pi/8 diag(cov)))``, or by sampling ``theta - theta* = Lambda^-1/2 eps`` and
pushing each sample through the hand-derived Jacobian-vector product (:func:`mnet.jvp`: no Jacobian at all);
regression returns the mean and the variance ``diag(cov) + sigma^2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mnet.core.protocol import LayerProtocol, Params
from mnet.core.tangent import tangent_walk
from mnet.core.walk import MissingRule, StackedQuantity, walk
from mnet.losses import Loss
from mnet.quantities.ggn import check_samples, loss_square_root, summed_diag_ggn
from mnet.quantities.jacobian import jacobian, output_basis
from mnet.quantities.kronecker import KroneckerFactors, is_factor_pair, stack_bias, unstack_bias
from mnet.quantities.per_example import per_example_stack

Array = jax.Array
STRUCTURES = ("diag", "kron")
LINKS = ("probit", "sampled", "map")


class KronBlock(NamedTuple):
    """One dense-like layer's curvature ``s N P kron(A, G)``, eigendecomposed: ``A = A_vecs diag(A_vals) A_vecs^T``,
    ``G = G_vecs diag(G_vals) G_vecs^T``, the scale ``s N P`` folded into ``G_vals``."""

    A_vals: Array
    A_vecs: Array
    G_vals: Array
    G_vecs: Array


def _is_entry(node: Any) -> bool:
    return is_factor_pair(node) or node is None or isinstance(node, KronBlock)


def _map_entries(fn: Callable[..., Any], structure: Any, *trees: Any) -> Any:
    """``fn(entry, *subtrees)`` at every layer entry of ``structure`` (a factor pair, a :class:`KronBlock`, None for a
    layer without Kronecker structure, or a parameterless layer's ``()``), with the matching subtrees of ``trees``
    (like params)."""
    if _is_entry(structure) or structure == ():
        return fn(structure, *trees)
    if isinstance(structure, dict):
        return {name: _map_entries(fn, structure[name], *(tree[name] for tree in trees)) for name in structure}
    return type(trees[0])(_map_entries(fn, *children) for children in zip(structure, *trees))


class _DataKronecker(KroneckerFactors):
    """:func:`mnet.kfac_factors`' walk with every ``G`` multiplied by the layer's number of output positions, so that
    ``kron(A, G)`` approximates the layer's GGN block per example whatever its positions (see
    :meth:`mnet.Dense.kronecker_factors`: the block is ``P kron(A, G)``)."""

    def share_of(self, layer, params, caches, carried):
        factors = super().share_of(layer, params, caches, carried)
        positions = math.prod(carried[0].shape[2:-1])
        return jax.tree_util.tree_map(
            lambda pair: {"A": pair["A"], "G": positions * pair["G"]} if is_factor_pair(pair) else pair,
            factors,
            is_leaf=_is_entry,
        )


DATA_KRONECKER = _DataKronecker()


def _positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"laplace: {name} must be a positive number, got {value!r}")
    return float(value)


def _chunks(n: int, batch_size: int) -> list[slice]:
    return [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def fit_chunk(net, loss, structure, mc_samples, params, x, targets, key):
    """One chunk's summed negative log-likelihood (in loss units), summed GGN diagonal, and (for ``"kron"``) its
    factors with positions folded in; the factors are means over the chunk."""
    outputs, cache = net.forward(params, x)
    loss_sum = jnp.sum(loss.per_example(outputs, targets))
    S = loss_square_root(loss, outputs, targets, mc_samples, key)
    diagonal = summed_diag_ggn(net, params, x, cache, S)
    factors = walk(net, DATA_KRONECKER, params, (cache,), (S,))[0] if structure == "kron" else None
    return loss_sum, diagonal, factors


def _eigen_block(pair: dict, scale: float) -> KronBlock:
    a, U = jnp.linalg.eigh(pair["A"])
    g, V = jnp.linalg.eigh(pair["G"])
    return KronBlock(jnp.maximum(a, 0), U, scale * jnp.maximum(g, 0), V)


class Laplace:
    """A fitted Laplace approximation (built by :func:`laplace`); immutable: :meth:`optimize_prior_precision` and
    :meth:`with_prior_precision` return new ones.

    Attributes:
        net, loss, params: the network, its loss and the parameters ``theta*`` the posterior is centred on.
        structure: ``"diag"`` or ``"kron"``.
        likelihood: ``"classification"`` or ``"regression"``.
        prior_precision: ``alpha``; ``sigma_noise``: the Gaussian noise (regression).
        n_data: ``N``; n_params: the number of parameters; log_likelihood: ``log p(D | theta*)``.
        curvature: the diagonal of ``s N GGN``, like ``params`` (used where no Kronecker block is).
        entries: None for ``"diag"``; for ``"kron"`` a tree like :func:`mnet.kfac_factors`' result with a
            :class:`KronBlock` at every Kronecker-factored entry, None at the other layers with parameters.
    """

    def __init__(
        self, net, loss, params, structure, curvature, entries, *, prior_precision, sigma_noise, n_data, log_likelihood
    ):
        self.net, self.loss, self.params = net, loss, params
        self.structure, self.curvature, self.entries = structure, curvature, entries
        self.likelihood = loss.likelihood("laplace")
        self.prior_precision, self.sigma_noise = prior_precision, sigma_noise
        self.n_data, self.log_likelihood = n_data, log_likelihood
        leaves = jax.tree_util.tree_leaves(params)
        self.n_params = sum(leaf.size for leaf in leaves)
        self._sq_norm: Array = sum((jnp.sum(jnp.square(leaf)) for leaf in leaves), jnp.zeros(()))

    def __repr__(self) -> str:
        return (
            f"Laplace(structure={self.structure!r}, likelihood={self.likelihood!r}, n_data={self.n_data}, "
            f"n_params={self.n_params}, prior_precision={float(self.prior_precision):.4g})"
        )

    def with_prior_precision(self, prior_precision: float) -> Laplace:
        """The same approximation with another prior precision (the curvature does not depend on it)."""
        return Laplace(
            self.net,
            self.loss,
            self.params,
            self.structure,
            self.curvature,
            self.entries,
            prior_precision=_positive(float(prior_precision), "prior_precision"),
            sigma_noise=self.sigma_noise,
            n_data=self.n_data,
            log_likelihood=self.log_likelihood,
        )

    # -- the evidence ---------------------------------------------------------------------------------------------

    def eigenvalues(self) -> Array:
        """The eigenvalues of ``s N GGN`` in the chosen structure, one per parameter (O(parameters) memory)."""
        parts = []

        def collect(entry, curv):
            if isinstance(entry, KronBlock):
                parts.append(jnp.outer(entry.A_vals, entry.G_vals).reshape(-1))
            else:
                parts.extend(leaf.reshape(-1) for leaf in jax.tree_util.tree_leaves(curv))

        _map_entries(collect, self.entries, self.curvature)
        return jnp.concatenate(parts)

    def log_marginal_likelihood(self, prior_precision: float | Array | None = None) -> Array:
        """``log p(D | alpha)`` of the Laplace approximation (the module docstring's formula) at ``prior_precision``
        (default: this approximation's ``alpha``), a scalar."""
        alpha = self.prior_precision if prior_precision is None else prior_precision
        return _log_evidence(self.eigenvalues(), self.log_likelihood, self._sq_norm, jnp.asarray(alpha))

    def optimize_prior_precision(
        self,
        method: str = "marglik",
        *,
        x_val: Array | None = None,
        targets_val: Array | None = None,
        grid: Any = None,
        lower: float = 1e-8,
        upper: float = 1e8,
    ) -> Laplace:
        """The approximation with a prior precision chosen from the data (``theta*`` and the curvature held fixed).

        Arguments:
            method: ``"marglik"`` maximises :meth:`log_marginal_likelihood` by bisection on the sign of its
                derivative in ``log alpha`` within ``[lower, upper]`` (to a relative 1e-12, or at a bound when the
                maximum lies beyond it). ``"nll"`` minimises the negative log-likelihood of the probit (regression:
                Gaussian) predictive on held-out data ``(x_val, targets_val)`` over ``grid``.
            x_val, targets_val: held-out data, for ``"nll"``.
            grid: candidate precisions for ``"nll"`` (default: 41 values, log-spaced from 1e-2 to 1e6).

        Returns:
            A new :class:`Laplace`.
        """
        if method == "marglik":
            alpha = _maximise_evidence(self.eigenvalues(), self._sq_norm, math.log(lower), math.log(upper))
            return self.with_prior_precision(float(alpha))
        if method != "nll":
            raise ValueError(f'laplace: method must be "marglik" or "nll", got {method!r}')
        if x_val is None or targets_val is None:
            raise ValueError(
                'laplace: method="nll" chooses the prior precision on held-out data: pass x_val= and targets_val='
            )
        candidates = [float(a) for a in (jnp.logspace(-2, 6, 41) if grid is None else grid)]
        losses = [self.with_prior_precision(alpha).predictive_nll(x_val, targets_val) for alpha in candidates]
        return self.with_prior_precision(candidates[int(jnp.argmin(jnp.asarray(losses)))])

    def predictive_nll(self, x: Array, targets: Array) -> float:
        """The mean negative log-likelihood of ``targets`` under the probit (regression: Gaussian) predictive."""
        if self.likelihood == "regression":
            prediction = self.predict(x)
            assert isinstance(prediction, tuple)
            mean, variance = prediction
            return float(
                jnp.mean(
                    jnp.sum(
                        0.5 * jnp.log(2 * math.pi * variance) + (targets - mean) ** 2 / (2 * variance),
                        axis=tuple(range(1, mean.ndim)),
                    )
                )
            )
        probs = self.predict(x)
        assert not isinstance(probs, tuple)
        return float(self.loss.predictive_negative_log_likelihood(probs, targets))

    # -- the posterior --------------------------------------------------------------------------------------------

    def posterior_variance(self) -> Params:
        """The marginal variances of every parameter, like params (``"kron"``: the diagonal of each block's
        inverse, ``sum_ij U_ki^2 V_lj^2 / (a_i g_j + alpha)``)."""
        alpha = self.prior_precision

        def variance(entry, curv, like):
            if isinstance(entry, KronBlock):
                inverse = 1 / (jnp.outer(entry.A_vals, entry.G_vals) + alpha)
                return unstack_bias((entry.A_vecs**2) @ inverse @ (entry.G_vecs**2).T, like)
            return jax.tree_util.tree_map(lambda d: 1 / (d + alpha), curv)

        return _map_entries(variance, self.entries, self.curvature, self.params)

    def scale_by_root(self, eps: Params) -> Params:
        """``Lambda^-1/2 eps`` (``eps`` like params): with ``eps ~ N(0, I)`` a draw of ``theta - theta*``. Its matrix
        ``R`` satisfies ``R R^T = Lambda^-1``; a Kronecker block's is ``U [E / sqrt(a g^T + alpha)] V^T``."""
        return _scale_by_root(self.entries, self.curvature, eps, self.params, self.prior_precision)

    def sample(self, key: Array, samples: int = 1) -> Params:
        """``samples`` draws from the posterior: like params, every leaf with a leading ``samples`` axis."""
        keys = jax.random.split(key, samples)
        return jax.vmap(
            lambda k: jax.tree_util.tree_map(jnp.add, self.params, self.scale_by_root(normal_like(k, self.params)))
        )(keys)

    # -- the linearised predictive --------------------------------------------------------------------------------

    def functional_covariance(self, x: Array, *, batch_size: int = 64) -> tuple[Array, Array]:
        """``(f, cov)``: the network's outputs at ``theta*`` and, per example, ``J Lambda^-1 J^T`` over its ``K``
        outputs flattened, ``(batch, K, K)``; computed ``batch_size`` examples at a time."""
        outs, covs = [], []
        for part in _chunks(x.shape[0], batch_size):
            f, cov = batch_functional_covariance(
                self.net, self.entries, self.curvature, self.params, x[part], self.prior_precision
            )
            outs.append(f)
            covs.append(cov)
        return jnp.concatenate(outs), jnp.concatenate(covs)

    def predict(
        self, x: Array, *, link: str = "probit", samples: int = 100, key: Array | None = None, batch_size: int = 64
    ) -> Array | tuple[Array, Array]:
        """The linearised (GLM) predictive at inputs ``x``.

        Arguments:
            x: a batch of inputs.
            link: ``"probit"`` (closed form from the functional variance), ``"sampled"`` (``samples`` draws of
                the parameters pushed through the hand-derived Jacobian-vector product; needs ``key``) or
                ``"map"`` (the plug-in prediction at ``theta*``, for comparison).
            samples, key: for ``link="sampled"``.
            batch_size: examples per compiled call.

        Returns:
            Classification: probabilities, ``(batch, classes)`` for the softmax cross-entropy (rows sum to one),
            per output unit for the sigmoid. Regression: ``(mean, variance)``, each like the outputs, the variance
            ``diag(J Lambda^-1 J^T) + sigma^2``.
        """
        if link not in LINKS:
            raise ValueError(f"laplace.predict: link must be one of {LINKS}, got {link!r}")
        if link == "sampled" and key is None:
            raise ValueError('laplace.predict(link="sampled") draws parameters: pass key=jax.random.key(...)')
        if link == "sampled" and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
            raise ValueError(f"laplace.predict: samples must be a positive int, got {samples!r}")
        noise = self.sigma_noise**2
        if link == "sampled":
            assert key is not None
            moments = [
                _sampled_moments(
                    self.net,
                    self.loss,
                    self.entries,
                    self.curvature,
                    self.params,
                    x[part],
                    self.prior_precision,
                    jax.random.fold_in(key, i),
                    samples,
                )
                for i, part in enumerate(_chunks(x.shape[0], batch_size))
            ]
            first, second = (jnp.concatenate(m) for m in zip(*moments))
            if self.likelihood == "classification":
                return first
            return first, second - first**2 + noise
        if link == "map":
            f = self.net.forward(self.params, x)[0]
            variance = jnp.zeros_like(f)
        else:
            f, cov = self.functional_covariance(x, batch_size=batch_size)
            variance = jnp.diagonal(cov, axis1=1, axis2=2).reshape(f.shape)
        if self.likelihood == "regression":
            return f, variance + noise
        return self.loss.predictive(f / jnp.sqrt(1 + math.pi / 8 * variance))


def normal_like(key: Array, like: Params) -> Params:
    leaves, treedef = jax.tree_util.tree_flatten(like)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    )


def _scale_by_root(entries: Any, curvature: Any, eps: Params, like: Params, alpha) -> Params:
    def scale(entry, curv, e, p):
        if isinstance(entry, KronBlock):
            root = 1 / jnp.sqrt(jnp.outer(entry.A_vals, entry.G_vals) + alpha)
            return unstack_bias(entry.A_vecs @ (stack_bias(e) * root) @ entry.G_vecs.T, p)
        return jax.tree_util.tree_map(lambda d, n: n / jnp.sqrt(d + alpha), curv, e)

    return _map_entries(scale, entries, curvature, eps, like)


def _block_covariance(J: Any, entry: Any, variances: Any, alpha: Array) -> Array:
    """``(batch, K, K)``: one layer entry's share of ``J Lambda^-1 J^T`` from its per-example gradients ``J`` (leaves
    ``(K, batch, *leaf)``): against a :class:`KronBlock` in its eigenbasis, where the block's inverse is diagonal,
    ``(U^T M V) / (a g^T + alpha)`` contracted with ``U^T M' V``; else leaf by leaf against the variances."""
    if isinstance(entry, KronBlock):
        rotated = jnp.einsum("ia,kbij,jc->kbac", entry.A_vecs, stack_bias(J), entry.G_vecs)
        weights = 1 / (jnp.outer(entry.A_vals, entry.G_vals) + alpha)
        return jnp.einsum("kbac,jbac,ac->bkj", rotated, rotated, weights)
    shares = [
        jnp.einsum("kbp,jbp,p->bkj", g.reshape(g.shape[:2] + (-1,)), g.reshape(g.shape[:2] + (-1,)), v.reshape(-1))
        for g, v in zip(jax.tree_util.tree_leaves(J), jax.tree_util.tree_leaves(variances))
    ]
    return sum(shares[1:], shares[0])


class _FunctionCovariance(StackedQuantity):
    """``J Lambda^-1 J^T`` per example, one layer's block at a time: the walk carries one cotangent per network output
    (as for the NTK), every unit with parameters takes its per-example gradients for all of them (its own block of
    the Jacobian, nothing more) and contracts them against its block of the posterior covariance at once.

    A unit's posterior block is found by the identity of its parameter arrays: the walk hands every unit the arrays
    of the params tree it was given (combinators and compound layers index and regroup, never copy), so a table
    from each array's ``id`` to its entry, built from that same tree inside the trace, serves every built-in layer.
    A unit whose arrays are not in the table (a user's compound layer that transforms its parameters) raises
    :class:`MissingRule`, and the caller contracts the whole Jacobian instead."""

    rule = "function_covariance"  # no layer has one: every share comes from the per-example rule

    def __init__(self, table: dict[int, tuple[Any, Any]], alpha: Array):
        self.table, self.alpha = table, alpha

    def share(self, layer, params, caches, carried):
        leaves = jax.tree_util.tree_leaves(params)
        if any(id(leaf) not in self.table for leaf in leaves):
            raise MissingRule(layer, self.rule)
        found = [self.table[id(leaf)] for leaf in leaves]
        J = per_example_stack(layer, params, caches[0], carried[0])
        blocks = [entry for entry, _ in found if isinstance(entry, KronBlock)]
        if blocks:  # a dense-like unit: one Kronecker block over its [W; b]
            return _block_covariance(J, blocks[0], None, self.alpha)
        return _block_covariance(J, None, [variance for _, variance in found], self.alpha)

    def finish(self, shares, carried):
        stack = carried[0]
        empty = jnp.zeros((stack.shape[1], stack.shape[0], stack.shape[0]), stack.dtype)
        return sum(jax.tree_util.tree_leaves(shares), empty)


def _posterior_table(entries: Any, curvature: Any, params: Params, alpha: Array) -> dict[int, tuple[Any, Any]]:
    """``id(parameter array) -> (KronBlock or None, its variances or None)`` for every array of ``params``."""
    table: dict[int, tuple[Any, Any]] = {}

    def visit(entry, curv, p):
        if isinstance(entry, KronBlock):
            for leaf in jax.tree_util.tree_leaves(p):
                table[id(leaf)] = (entry, None)
        else:
            for leaf, d in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(curv)):
                table[id(leaf)] = (None, 1 / (d + alpha))

    _map_entries(visit, entries, curvature, params)
    return table


@partial(jax.jit, static_argnums=(0,))
def batch_functional_covariance(net, entries, curvature, params, x, alpha):
    f, cache = net.forward(params, x)
    try:
        quantity = _FunctionCovariance(_posterior_table(entries, curvature, params, alpha), alpha)
        return f, quantity.run(net, params, cache, output_basis(f))[0]
    except MissingRule:
        pass
    # The whole Jacobian of the batch, contracted entry by entry.
    jac = jacobian(net)(params, x)
    batch, K = f.shape[0], math.prod(f.shape[1:])
    shares: list[Array] = []

    def share(entry, curv, J):
        if not jax.tree_util.tree_leaves(J):
            return
        J = jax.tree_util.tree_map(lambda leaf: jnp.moveaxis(leaf.reshape((batch, K) + leaf.shape[f.ndim :]), 1, 0), J)
        variances = None if isinstance(entry, KronBlock) else jax.tree_util.tree_map(lambda d: 1 / (d + alpha), curv)
        shares.append(_block_covariance(J, entry if isinstance(entry, KronBlock) else None, variances, alpha))

    _map_entries(share, entries, curvature, jac)
    return f, sum(shares, jnp.zeros((batch, K, K), f.dtype))


@partial(jax.jit, static_argnums=(0, 1, 8))
def _sampled_moments(net, loss, entries, curvature, params, x, alpha, key, samples):
    """The mean over ``samples`` draws of the linearised model's prediction (probabilities for classification,
    outputs for regression), and of its square."""
    f, cache = net.forward(params, x)

    def one(carry, k):
        delta = _scale_by_root(entries, curvature, normal_like(k, params), params, alpha)
        df, _ = tangent_walk(net, params, cache, delta, None)
        value = loss.predictive(f + df)
        return (carry[0] + value, carry[1] + value * value), None

    (first, second), _ = jax.lax.scan(one, (jnp.zeros_like(f), jnp.zeros_like(f)), jax.random.split(key, samples))
    return first / samples, second / samples


def _log_evidence(eigenvalues: Array, log_likelihood: Array, sq_norm: Array, alpha: Array) -> Array:
    eigenvalues = eigenvalues.astype(jnp.result_type(eigenvalues, alpha))
    return (
        log_likelihood
        - alpha / 2 * sq_norm
        + eigenvalues.size / 2 * jnp.log(alpha)
        - jnp.sum(jnp.log(eigenvalues + alpha)) / 2
    )


@jax.jit
def _maximise_evidence(eigenvalues: Array, sq_norm: Array, lower: float, upper: float) -> Array:
    def slope(log_alpha):  # 2 alpha d/d alpha log p(D | alpha): the same sign, better scaled
        alpha = jnp.exp(log_alpha)
        return -alpha * sq_norm + jnp.sum(eigenvalues / (eigenvalues + alpha))

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        rising = slope(mid) > 0
        return jnp.where(rising, mid, lo), jnp.where(rising, hi, mid)

    lo, hi = jax.lax.fori_loop(
        0, 200, halve, (jnp.asarray(lower, eigenvalues.dtype), jnp.asarray(upper, eigenvalues.dtype))
    )
    return jnp.exp((lo + hi) / 2)


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

    Returns:
        A :class:`Laplace`: ``log_marginal_likelihood``, ``optimize_prior_precision``, ``posterior_variance``,
        ``sample``, ``functional_covariance`` and ``predict``.

    Raises:
        ValueError: for an unknown structure, a non-positive precision or noise, a loss with no known
            likelihood, inputs and targets of different lengths, or ``"kron"`` on a network with no
            Kronecker-factored layer.
    """
    if structure not in STRUCTURES:
        raise ValueError(f"laplace: structure must be one of {STRUCTURES}, got {structure!r}")
    alpha = _positive(prior_precision, "prior_precision")
    sigma = _positive(sigma_noise, "sigma_noise")
    loss.likelihood("laplace")
    check_samples(mc_samples)
    if mc_samples is not None and key is None:
        raise ValueError(
            f"laplace(mc_samples={mc_samples}) estimates the GGN by sampling: pass key=jax.random.key(...)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"laplace: batch_size must be a positive int, got {batch_size!r}")
    n = jnp.shape(x)[0] if jnp.ndim(x) else 0
    if n == 0 or jnp.shape(targets)[:1] != (n,):
        raise ValueError(
            f"laplace: x and targets must hold the same number (> 0) of examples, got x {jnp.shape(x)} and "
            f"targets {jnp.shape(targets)}"
        )
    loss_sum, diagonal, factors = 0.0, None, None
    for i, part in enumerate(_chunks(n, batch_size)):
        chunk_key = None if key is None else jax.random.fold_in(key, i)
        total, diag, kron = fit_chunk(net, loss, structure, mc_samples, params, x[part], targets[part], chunk_key)
        size = part.stop - part.start
        loss_sum = loss_sum + total
        diagonal = diag if diagonal is None else jax.tree_util.tree_map(jnp.add, diagonal, diag)
        if structure == "kron":
            weighted = jax.tree_util.tree_map(lambda f, size=size: f * size, kron)
            factors = weighted if factors is None else jax.tree_util.tree_map(jnp.add, factors, weighted)
    units = math.prod(jax.eval_shape(lambda p, xs: net.forward(p, xs)[0], params, x[:1]).shape[1:])
    scale, constant = loss.negative_log_likelihood_affine(units, sigma)
    log_likelihood = -(scale * loss_sum + n * constant)
    curvature = jax.tree_util.tree_map(lambda d: scale * d, diagonal)
    entries = None
    if structure == "kron":
        if not any(is_factor_pair(node) for node in jax.tree_util.tree_leaves(factors, is_leaf=_is_entry)):
            raise ValueError(f'laplace: {net!r} has no layer with Kronecker factors; use structure="diag"')
        entries = jax.tree_util.tree_map(
            lambda node: _eigen_block({k: v / n for k, v in node.items()}, scale * n) if is_factor_pair(node) else node,
            factors,
            is_leaf=_is_entry,
        )
    return Laplace(
        net,
        loss,
        params,
        structure,
        curvature,
        entries,
        prior_precision=alpha,
        sigma_noise=sigma,
        n_data=n,
        log_likelihood=log_likelihood,
    )
