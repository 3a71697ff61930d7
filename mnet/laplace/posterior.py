"""``Laplace``: the fitted posterior, its evidence and prior precision, its samples and its predictive."""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from mnet.core.chunks import chunks
from mnet.core.protocol import Array, Params, call_forward
from mnet.errors import SearchEdgeWarning, SettingError
from mnet.laplace.evidence import log_evidence, maximise_evidence
from mnet.laplace.predictive import batch_functional_covariance, normal_like, sampled_moments, scale_by_root
from mnet.laplace.structure import LINKS, KronBlock, chunk_of, map_entries, positive
from mnet.laplace.subset import Features
from mnet.losses import with_mask
from mnet.quantities.kronecker import unstack_bias


def _report_edge(finding: str, widen: str) -> None:
    warnings.warn(
        f"laplace.optimize_prior_precision: {finding}; the optimum may lie beyond it, and the prior precision "
        f"returned is that edge: widen the search ({widen})",
        SearchEdgeWarning,
        stacklevel=3,
    )


class Laplace:
    """A fitted Laplace approximation (built by :func:`laplace`); immutable: :meth:`optimize_prior_precision` and
    :meth:`with_prior_precision` return new ones.

    Attributes:
        net, loss, params: the network, its loss and the parameters ``theta*`` the posterior is centred on (for
            ``subset="last_layer"`` the last layer and what follows it, and its params).
        subset: ``"all"`` or ``"last_layer"``; features: None, or the frozen layers before the last one
            (:class:`mnet.laplace.subset.Features`), which every method applies to its inputs first.
        structure: ``"diag"`` or ``"kron"``.
        likelihood: ``"classification"`` or ``"regression"``.
        prior_precision: ``alpha``; ``sigma_noise``: the Gaussian noise (regression).
        n_data: ``N``; n_params: the number of parameters; log_likelihood: ``log p(D | theta*)``.
        curvature: the diagonal of ``s N GGN`` (each example weighted by its own ``s_n``), like ``params`` (used
            where no Kronecker block is).
        entries: None for ``"diag"``; for ``"kron"`` a tree like :func:`mnet.kfac_factors`' result with a
            :class:`KronBlock` at every Kronecker-factored entry, None at the other layers with parameters.
    """

    def __init__(
        self,
        net,
        loss,
        params,
        structure,
        curvature,
        entries,
        *,
        prior_precision,
        sigma_noise,
        n_data,
        log_likelihood,
        features: Features | None = None,
    ):
        self.net, self.loss, self.params, self.features = net, loss, params, features
        self.subset = "all" if features is None else "last_layer"
        self.structure, self.curvature, self.entries = structure, curvature, entries
        self.likelihood = loss.likelihood("laplace")
        self.prior_precision, self.sigma_noise = prior_precision, sigma_noise
        self.n_data, self.log_likelihood = n_data, log_likelihood
        leaves = jax.tree_util.tree_leaves(params)
        self.n_params = sum(leaf.size for leaf in leaves)
        self._sq_norm: Array = sum((jnp.sum(jnp.square(leaf)) for leaf in leaves), jnp.zeros(()))

    def inputs(self, x: Array, batch_size: int = 64, mask: Array | None = None) -> Array:
        """What :attr:`net` reads for network inputs ``x`` (under their padding ``mask``): ``x`` itself, or a
        last-layer Laplace's features."""
        return x if self.features is None else self.features(x, batch_size, mask)

    def __repr__(self) -> str:
        return (
            f"Laplace(structure={self.structure!r}, subset={self.subset!r}, likelihood={self.likelihood!r}, "
            f"n_data={self.n_data}, n_params={self.n_params}, prior_precision={float(self.prior_precision):.4g})"
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
            prior_precision=positive(float(prior_precision), "prior_precision"),
            sigma_noise=self.sigma_noise,
            n_data=self.n_data,
            log_likelihood=self.log_likelihood,
            features=self.features,
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

        map_entries(collect, self.entries, self.curvature)
        return jnp.concatenate(parts)

    def log_marginal_likelihood(self, prior_precision: float | Array | None = None) -> Array:
        """``log p(D | alpha)`` of the Laplace approximation (the module docstring's formula) at ``prior_precision``
        (default: this approximation's ``alpha``), a scalar."""
        alpha = self.prior_precision if prior_precision is None else prior_precision
        return log_evidence(self.eigenvalues(), self.log_likelihood, self._sq_norm, jnp.asarray(alpha))

    def optimize_prior_precision(
        self,
        method: str = "marglik",
        *,
        x_val: Array | None = None,
        targets_val: Array | None = None,
        mask_val: Array | None = None,
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
            x_val, targets_val: held-out data, for ``"nll"``; mask_val: its padding mask, if the model reads one.
            grid: candidate precisions for ``"nll"`` (default: 41 values, log-spaced from 1e-2 to 1e6).

        Returns:
            A new :class:`Laplace`.

        Warns:
            SearchEdgeWarning: the best value lies at the edge of the grid or of ``[lower, upper]``, so the
                precision returned is that edge rather than an optimum.
        """
        if method == "marglik":
            alpha = float(maximise_evidence(self.eigenvalues(), self._sq_norm, math.log(lower), math.log(upper)))
            edge = min((lower, upper), key=lambda bound: abs(math.log(alpha / bound)))
            if abs(math.log(alpha / edge)) < 1e-6:
                _report_edge(f"the marginal likelihood rises towards the search's bound {edge:g}", "lower=/upper=")
            return self.with_prior_precision(alpha)
        if method != "nll":
            raise SettingError(f'laplace: method must be "marglik" or "nll", got {method!r}')
        if x_val is None or targets_val is None:
            raise SettingError(
                'laplace: method="nll" chooses the prior precision on held-out data: pass x_val= and targets_val='
            )
        candidates = [float(a) for a in (jnp.logspace(-2, 6, 41) if grid is None else grid)]
        losses = [
            self.with_prior_precision(alpha).predictive_nll(x_val, targets_val, mask=mask_val) for alpha in candidates
        ]
        best = int(jnp.argmin(jnp.asarray(losses)))
        if len(candidates) > 1 and best in (0, len(candidates) - 1):
            end = "smallest" if candidates[best] == min(candidates) else "largest"
            _report_edge(f"the held-out NLL is least at the grid's {end} value, {candidates[best]:g}", "grid=")
        return self.with_prior_precision(candidates[best])

    def predictive_nll(self, x: Array, targets: Array, *, mask: Array | None = None) -> float:
        """The mean negative log-likelihood of ``targets`` under the probit (regression: Gaussian) predictive; under a
        padding ``mask`` the padded positions count for nothing."""
        loss, targets = with_mask(self.loss, targets, mask)
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
        probs = self.predict(x, mask=mask)
        assert not isinstance(probs, tuple)
        return float(loss.predictive_negative_log_likelihood(probs, targets))

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

        return map_entries(variance, self.entries, self.curvature, self.params)

    def scale_by_root(self, eps: Params) -> Params:
        """``Lambda^-1/2 eps`` (``eps`` like params): with ``eps ~ N(0, I)`` a draw of ``theta - theta*``. Its matrix
        ``R`` satisfies ``R R^T = Lambda^-1``; a Kronecker block's is ``U [E / sqrt(a g^T + alpha)] V^T``."""
        return scale_by_root(self.entries, self.curvature, eps, self.params, self.prior_precision)

    def sample(self, key: Array, samples: int = 1) -> Params:
        """``samples`` draws from the posterior: like params, every leaf with a leading ``samples`` axis."""
        keys = jax.random.split(key, samples)
        return jax.vmap(
            lambda k: jax.tree_util.tree_map(jnp.add, self.params, self.scale_by_root(normal_like(k, self.params)))
        )(keys)

    # -- the linearised predictive --------------------------------------------------------------------------------

    def functional_covariance(
        self, x: Array, *, batch_size: int = 64, mask: Array | None = None
    ) -> tuple[Array, Array]:
        """``(f, cov)``: the network's outputs at ``theta*`` and, per example, ``J Lambda^-1 J^T`` over its ``K``
        outputs flattened, ``(batch, K, K)``; computed ``batch_size`` examples at a time, under the inputs' padding
        ``mask`` if the model reads one (a padded position's outputs are computed too, and mean nothing)."""
        outs, covs = [], []
        for part in chunks(x.shape[0], batch_size):
            rows = chunk_of(mask, part)
            f, cov = batch_functional_covariance(
                self.net,
                self.entries,
                self.curvature,
                self.params,
                self.inputs(x[part], batch_size, rows),
                self.prior_precision,
                rows,
            )
            outs.append(f)
            covs.append(cov)
        return jnp.concatenate(outs), jnp.concatenate(covs)

    def predict(
        self,
        x: Array,
        *,
        link: str = "probit",
        samples: int = 100,
        key: Array | None = None,
        batch_size: int = 64,
        mask: Array | None = None,
    ) -> Array | tuple[Array, Array]:
        """The linearised (GLM) predictive at inputs ``x``.

        Arguments:
            x: a batch of inputs.
            link: ``"probit"`` (closed form from the functional variance), ``"sampled"`` (``samples`` draws of
                the parameters pushed through the hand-derived Jacobian-vector product; needs ``key``) or
                ``"map"`` (the plug-in prediction at ``theta*``, for comparison).
            samples, key: for ``link="sampled"``.
            batch_size: examples per compiled call.
            mask: the inputs' padding mask, for a model that reads one.

        Returns:
            Classification: probabilities, ``(batch, classes)`` for the softmax cross-entropy (rows sum to one),
            per output unit for the sigmoid. Regression: ``(mean, variance)``, each like the outputs, the variance
            ``diag(J Lambda^-1 J^T) + sigma^2``.
        """
        if link not in LINKS:
            raise SettingError(f"laplace.predict: link must be one of {LINKS}, got {link!r}")
        if link == "sampled" and key is None:
            raise SettingError('laplace.predict(link="sampled") draws parameters: pass key=jax.random.key(...)')
        if link == "sampled" and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
            raise SettingError(f"laplace.predict: samples must be a positive int, got {samples!r}")
        noise = self.sigma_noise**2
        if link == "sampled":
            assert key is not None
            moments = [
                sampled_moments(
                    self.net,
                    self.loss,
                    self.entries,
                    self.curvature,
                    self.params,
                    self.inputs(x[part], batch_size, chunk_of(mask, part)),
                    self.prior_precision,
                    jax.random.fold_in(key, i),
                    samples,
                    chunk_of(mask, part),
                )
                for i, part in enumerate(chunks(x.shape[0], batch_size))
            ]
            first, second = (jnp.concatenate(m) for m in zip(*moments))
            if self.likelihood == "classification":
                return first
            return first, second - first**2 + noise
        if link == "map":
            f = call_forward(self.net, self.params, self.inputs(x, batch_size, mask), mask=mask)[0]
            variance = jnp.zeros_like(f)
        else:
            f, cov = self.functional_covariance(x, batch_size=batch_size, mask=mask)
            variance = jnp.diagonal(cov, axis1=1, axis2=2).reshape(f.shape)
        if self.likelihood == "regression":
            return f, variance + noise
        return self.loss.predictive(f / jnp.sqrt(1 + math.pi / 8 * variance))
