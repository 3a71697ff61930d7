"""The benchmark suite: hand-derived against autodiff (and other frameworks where installed), side by side in one
process; ``mnet bench`` runs it."""
