"""Benchmark rows for long sequences (``mnet bench`` rows M1-512 to M1-4096): one training step of a transformer
classifier with blockwise attention (hand-derived, O(T) memory), with unblocked attention (hand-derived, keeps the
``T x T`` probabilities) and under ``jax.grad``; time and XLA's memory analysis side by side. Like
:mod:`mnet.bench`, this module calls JAX's autodiff: it is a contender."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mnet import models
from mnet.bench import Row, interleaved_medians, step_contenders

#: The M1 model: width 64, 4 heads (head width 16), one block; batch 4; 16 tokens and classes.
WIDTH, HEADS, BATCH, VOCAB = 64, 4, 4, 16
#: Blocks of 128 queries and keys: 16 KB of probabilities per head and batch entry per block pair; 64 and 256
#: gave the same temporary memory at T = 1024 on the 2-core machine, 512 twice as much (and slower).
BLOCK = 128
LENGTHS = (512, 1024, 2048, 4096)


def memory_problem(length: int, batch: int = BATCH, block: int = BLOCK) -> dict[str, Callable[[], object]]:
    """The three M1 contenders at sequence length ``length``, each a jitted SGD step on fixed arguments
    (``functools.partial`` of a jitted function: ``step.func.lower(*step.args)`` compiles it without running)."""
    ids = jax.random.randint(jax.random.key(1), (batch, length), 0, VOCAB)
    y = jax.random.randint(jax.random.key(2), (batch,), 0, VOCAB)
    contenders: dict[str, Callable[[], object]] = {}
    for name, block_size in (("hand blockwise", block), ("hand", None)):
        net = models.transformer_classifier(VOCAB, VOCAB, width=WIDTH, heads=HEADS, block_size=block_size)
        _, params = net.init(jax.random.key(0), (length,), jnp.float32)
        steps = step_contenders(net, params, ids, y)
        contenders[name] = steps["hand"]
        if block_size is None:
            contenders["jax.grad"] = steps["jax.grad"]
    return contenders


def row_long_sequence_step(length: int, rounds: int) -> Row:
    """M1 at one sequence length: the three contenders interleaved."""
    return Row(
        f"M1-{length}",
        f"training step, transformer (width {WIDTH}, {HEADS} heads, attention blocks of {BLOCK}), batch {BATCH}, "
        f"length {length}, float32",
        interleaved_medians(memory_problem(length), rounds),
        "jax.grad",
        {},
    )


def plans(quick: bool, rounds: int) -> dict[str, Any]:
    """The M1 rows for :func:`mnet.bench.run`: the long lengths with few rounds (a ``jax.grad`` step at T = 4096
    takes seconds and 5.4 GB); ``quick`` runs one short length."""
    lengths = (256,) if quick else LENGTHS
    return {
        f"M1-{length}": functools.partial(row_long_sequence_step, length, rounds if quick else min(rounds, 5))
        for length in lengths
    }
