"""Tests run with JAX x64 on so that float64 comparisons can be tight; float32 tests build float32 arrays
explicitly, which also checks that nothing silently promotes them."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# The tests check values, never speed: LLVM's cheapest code generation compiles the suite's thousands of small
# programs about a third faster (test_cnn_derivatives: 15.6 s against 10.1 s on the 2-core machine). XLA's own
# passes, and so every compiled memory analysis a test reads, are unchanged. Subprocesses inherit it; a run that
# must compile as users' programs do (the seed examples' last bits) sets MNET_TESTS_DEFAULT_COMPILER=1.
if os.environ.get("MNET_TESTS_DEFAULT_COMPILER") != "1":
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

# One persistent compilation cache for the whole run, shared by the subprocesses the tests start (CLI runs, several
# processes, the bench): the same programs recompiled by later modules and by every subprocess are read back
# instead (the CLI, training and data-parallel tests: 117 s cold without it, 104 s with it). JAX keys each entry by
# the program, the devices and XLA_FLAGS, so a run under other flags compiles its own. Removed at the end. Only
# programs that took a second or more to compile are written: since the command-line tests run in-process, writing
# every small program cost more than reading them back saved (four heavy files: 366 s of CPU with every program
# written, 336 s with none).
_CACHE = tempfile.mkdtemp(prefix="mnet-tests-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

# Deliberate float32 products: GPUs run float32 matmuls as TF32 by default (about 1e-3 relative), which the
# float32 tolerances here are not written for; "highest" is full float32 there and changes nothing on CPU. Set
# through the environment so that the tests' subprocesses get it too.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from hypothesis import HealthCheck, settings  # noqa: E402 (after the environment is set)

settings.register_profile(
    "mnet", deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile("mnet")


import gc  # noqa: E402 (after the environment is set)

import pytest  # noqa: E402 (after the environment is set)


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Each test module starts with JAX's compilation caches empty: a whole suite's compiled programs, kept to the
    end, made later modules measurably slower (test_random_networks_float64_jitted: 9.9 s alone, 15.2 s at the
    end of the suite)."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True)
def _x64_kept():
    """A test that runs a command in-process (``mnet check --dtype float32`` sets JAX's x64 flag as a user's run
    needs) leaves the flag as the suite has it."""
    yield
    if not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)


_SLOW = {
    line.strip()
    for line in (Path(__file__).with_name("slow.txt")).read_text().splitlines()
    if line.strip() and not line.startswith("#")
}


def pytest_collection_modifyitems(config, items):
    """Mark the functions listed in ``slow.txt`` (measured, not guessed) as slow: ``--fast`` leaves them out. (The
    files keep their alphabetical order: putting the heaviest first, both workers compiling at once, made the whole
    run 1.5 min slower on the 2-core machine.)"""
    for item in items:
        if f"{item.nodeid.split('::')[0]}::{getattr(item, 'originalname', item.name)}" in _SLOW:
            item.add_marker(pytest.mark.slow)
