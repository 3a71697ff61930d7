"""Benchmark rows for long sequences: one training step, hand-derived against ``jax.grad``, time and XLA's memory
analysis side by side.

* M1-512 to M1-4096: a transformer classifier with blockwise attention (hand-derived, O(T) memory), with unblocked
  attention (hand-derived, keeps the ``T x T`` probabilities) and under ``jax.grad``.
* R1 (LSTM) and R2 (GRU): backpropagation through time by hand (a reverse scan that keeps only the states) against
  ``jax.grad`` through the forward ``lax.scan`` (which keeps every step's gates).

Like :mod:`mnet.bench`, this module calls JAX's autodiff: it is a contender."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mnet import models
from mnet.bench.problems import step_contenders
from mnet.bench.timing import Row, interleaved_medians
from mnet.layers import GRU, LSTM, Dense, LastStep, serial

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


#: The R rows: T = 100 steps of 64 features, batch 64, state width 256, then the last step's state classified.
RECURRENT = {"length": 100, "batch": 64, "features": 64, "hidden": 256, "classes": 10}


def recurrent_problem(cell: type, length: int, batch: int, features: int, hidden: int, classes: int):
    """``serial(cell(hidden), LastStep(), Dense(classes))`` with float32 params, a random batch and labels."""
    net = serial(cell(hidden), LastStep(), Dense(classes))
    _, params = net.init(jax.random.key(0), (length, features), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (batch, length, features), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (batch,), 0, classes)
    return net, params, x, y


def row_recurrent_step(name: str, cell: type, sizes: dict, rounds: int) -> Row:
    """R1/R2: one SGD step through the recurrence, hand-derived BPTT against ``jax.grad`` through ``lax.scan``."""
    net, params, x, y = recurrent_problem(cell, **sizes)
    return Row(
        name,
        f"training step, {cell.__name__}({sizes['hidden']}) over T = {sizes['length']} steps of "
        f"{sizes['features']} features, batch {sizes['batch']}, last step classified, float32",
        interleaved_medians(step_contenders(net, params, x, y), rounds),
        "jax.grad",
        {},
    )


def plans(quick: bool, rounds: int) -> dict[str, Any]:
    """The M1 and R rows for :func:`mnet.bench.run`: the long lengths with few rounds (a ``jax.grad`` step at
    T = 4096 takes seconds and 5.4 GB); ``quick`` runs one short length and small recurrences."""
    lengths = (256,) if quick else LENGTHS
    rows: dict[str, Any] = {
        f"M1-{length}": functools.partial(row_long_sequence_step, length, rounds if quick else min(rounds, 5))
        for length in lengths
    }
    sizes = dict(RECURRENT, length=12, batch=8, hidden=32) if quick else RECURRENT
    for name, cell in (("R1", LSTM), ("R2", GRU)):
        rows[name] = functools.partial(row_recurrent_step, name, cell, sizes, rounds if quick else min(rounds, 15))
    return rows
