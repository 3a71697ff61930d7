"""The referee: JAX autodiff and finite differences against the hand-derived path, for users and for the tests.
Only this package (and the benchmarks, where autodiff is a contender) calls JAX's automatic differentiation."""
