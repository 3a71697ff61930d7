"""Optimizers built on the quantities, as optax transformations: K-FAC and DP-SGD's noise."""
