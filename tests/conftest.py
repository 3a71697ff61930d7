"""Tests run with JAX x64 on so that float64 comparisons can be tight; float32 tests build float32 arrays
explicitly, which also checks that nothing silently promotes them."""

import jax

jax.config.update("jax_enable_x64", True)

from hypothesis import HealthCheck, settings

settings.register_profile(
    "mnet", deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile("mnet")
