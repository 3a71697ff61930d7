"""Training-data attribution by influence functions: ``score(q, n) = g_q^T (C + damping I)^-1 g_n`` between query
and training examples, with ``C`` the identity, the curvature's diagonal, K-FAC, EK-FAC or (small networks) the dense
GGN, fitted over the training set by hand; training gradients are never built for the set
(:mod:`mnet.influence.scores`)."""

from mnet.influence.preconditioner import PRECONDITIONERS, Preconditioner, fit_preconditioner
from mnet.influence.scores import Influence, TopK, influence, pairwise_scores

__all__ = [
    "PRECONDITIONERS",
    "Influence",
    "Preconditioner",
    "TopK",
    "fit_preconditioner",
    "influence",
    "pairwise_scores",
]
