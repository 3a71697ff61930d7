"""The Laplace approximation: a Gaussian posterior around trained parameters, from the hand-derived curvature.

Model. The data ``D = {(x_n, t_n)}``, ``n = 1..N``, have the likelihood the loss stands for,
``-log p(t_n | f(x_n; theta)) = s * l_n + c`` (``l_n`` the loss's per-example value): the softmax cross-entropy is
the categorical likelihood (``s = 1``), the sigmoid binary cross-entropy the Bernoulli one per output unit
(``s = U``, the number of units, since mnet averages over them), and the mean squared error a Gaussian with noise
``sigma`` (``s = U / (2 sigma^2)``, ``c = U/2 log(2 pi sigma^2)``). A sequence model's softmax cross-entropy
averages over the positions, its likelihood multiplies them: ``s_n = T_n``, the example's labelled positions
(:meth:`mnet.losses.Loss.likelihood_weights`), so that padding counts for nothing and every token once; the fit
scales each example's loss-Hessian square root by ``sqrt(s_n)``. The prior is isotropic,
``theta ~ N(0, alpha^-1 I)`` with precision ``alpha``. Around the trained parameters ``theta*`` the log posterior
is approximated to second order with the Gauss-Newton matrix in place of the Hessian:

    posterior = N(theta*, Lambda^-1),    Lambda = s N GGN + alpha I,

``GGN = mean_n J_n^T H_n J_n`` (:mod:`mnet.quantities.ggn`). ``structure`` chooses the approximation of ``GGN``:

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

Subsets. ``subset="last_layer"`` is the posterior over the last layer with parameters of a :func:`mnet.serial` alone,
the layers before it frozen at ``theta*`` as a feature map (Kristiadi et al. 2020; laplace-torch's
``subset_of_weights="last_layer"``): its curvature is the same GGN's block for that layer, and every method maps
its inputs through the features first. For a GPT that is the read-out ``h W`` at every position; a read-out tied to
the embedding has no parameters of its own, and is refused.

Masks. A causal decoder's padding is its labels' ``ignore_index``. A model that reads a padding mask (attention that
is not causal) takes it as every quantity does, ``laplace(..., mask=m)``, and the predictive methods take the mask
of their own inputs: the mask reaches the attention and the loss, so a padded position adds nothing.

Predictive (the linearised model, "GLM"): ``f(x; theta) ~ f(x; theta*) + J(x) (theta - theta*)``, so the outputs
are Gaussian with mean ``f(x; theta*)`` and covariance ``J(x) Lambda^-1 J(x)^T`` (``K x K`` per example). A walk
carrying one cotangent per output (as the NTK's does) computes it: every layer takes its own block of the
per-example Jacobian and contracts it against its block of ``Lambda^-1`` at once, so the whole Jacobian never
exists (:class:`_FunctionCovariance`). Classification turns it into probabilities by the probit
approximation, ``softmax(f / sqrt(1 + pi/8 diag(cov)))``, or by sampling ``theta - theta* = Lambda^-1/2 eps`` and
pushing each sample through the hand-derived Jacobian-vector product (:func:`mnet.jvp`: no Jacobian at all);
regression returns the mean and the variance ``diag(cov) + sigma^2``.
"""

from mnet.laplace.fit import laplace
from mnet.laplace.posterior import Laplace
from mnet.laplace.structure import KronBlock

__all__ = ["KronBlock", "Laplace", "laplace"]
