"""What :func:`mnet.check_layer` reports: one row per rule (where the rule comes from, how it agrees with autodiff),
and the comparison that fills a row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnet.checking.agreement import Agreement, largest_entry, tolerance
from mnet.core.protocol import has_params
from mnet.core.walk import own_rule


@dataclass(frozen=True)
class RuleRow:
    """One rule: where it comes from (``own``, ``default``, ``walk``, or ``absent``), and how it agrees with
    autodiff (the worst leaf)."""

    rule: str
    source: str
    agreement: Agreement | None = None
    worst: str = ""
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.agreement is None or self.agreement.ok


@dataclass(frozen=True)
class LayerReport:
    """The outcome of :func:`check_layer`: ``ok``, one :class:`RuleRow` per rule, ``str`` a table,
    ``to_dict()`` plain data."""

    layer: str
    input_shape: tuple[int, ...]
    batch: int
    rows: tuple[RuleRow, ...]
    #: The report's first line; by default ``check_layer <layer>, example shape ..., batch ..., float64``.
    title: str = ""

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def wrong(self) -> list[str]:
        """The names of the rules that disagree with autodiff."""
        return [row.rule for row in self.rows if not row.ok]

    def __getitem__(self, rule: str) -> RuleRow:
        return next(row for row in self.rows if row.rule == rule)

    def to_dict(self) -> dict:
        def agreement(a: Agreement | None):
            return None if a is None else {**a.__dict__, "ok": a.ok}

        return {
            "ok": self.ok,
            "layer": self.layer,
            "input_shape": list(self.input_shape),
            "batch": self.batch,
            "wrong": self.wrong,
            "rules": [
                {
                    "rule": r.rule,
                    "source": r.source,
                    "ok": r.ok,
                    "worst": r.worst,
                    "note": r.note,
                    "agreement": agreement(r.agreement),
                }
                for r in self.rows
            ],
        }

    def __str__(self) -> str:
        table = [["rule", "source", "max rel err", "worst leaf", ""]]
        for row in self.rows:
            error = "" if row.agreement is None else f"{row.agreement.max_rel_error:.2e}"
            table.append([row.rule, row.source, error, row.worst, "ok" if row.ok else "MISMATCH"])
            if row.note:
                table[-1][-1] += f" ({row.note})" if row.ok else f": {row.note}"
        widths = [max(len(line[i]) for line in table) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(line[:4], widths)) + "  " + line[4] for line in table]
        lines.insert(1, "-" * len(lines[0]))
        verdict = "every rule agrees with autodiff" if self.ok else f"DISAGREES with autodiff: {', '.join(self.wrong)}"
        return "\n".join(
            [
                (self.title or f"check_layer {self.layer}")
                + f", example shape {self.input_shape}, batch {self.batch}, float64",
                *lines,
                verdict,
            ]
        )


@dataclass(frozen=True)
class Check:
    """One rule to compare: the hand-derived function, its reference, the arguments both take, and the row's
    source (``own``, ``default``, ``driver``)."""

    rule: str
    source: str
    hand: Callable
    ref: Callable
    arguments: tuple


def compared_rows(checks: list[Check], missing: tuple[type[Exception], ...], note: Callable[[Exception], str]) -> list:
    """Every check's row, in order. A rule the layer or network cannot compute shows when its hand-derived function is
    traced (one of ``missing``): its row is "absent", with ``note(error)``. The rest are compiled as two programs,
    every hand-derived function in one and every reference in the other, the arguments passed in (never baked in as
    constants): a dozen small compilations cost more than two larger ones (``check_network`` on an MLP: 8.6 s
    against 6.0 s)."""
    absent: dict[str, str] = {}
    for check in checks:
        try:
            jax.eval_shape(check.hand, *check.arguments)
        except missing as error:
            absent[check.rule] = note(error)
    present = [check for check in checks if check.rule not in absent]
    inputs = [check.arguments for check in present]
    mine = jax.jit(lambda every: [check.hand(*a) for check, a in zip(present, every)])(inputs)
    theirs = jax.jit(lambda every: [check.ref(*a) for check, a in zip(present, every)])(inputs)
    found = {check.rule: (a, b) for check, a, b in zip(present, mine, theirs)}
    return [
        RuleRow(check.rule, "absent", note=absent[check.rule])
        if check.rule in absent
        else compare_rule(check.rule, check.source, *found[check.rule])
        for check in checks
    ]


def compare_rule(rule: str, source: str, mine: Any, ref: Any) -> RuleRow:
    """The worst floating leaf of ``mine`` against ``ref``, each relative to its own largest entry or to the whole
    reference's (for leaves that are zero in exact arithmetic, as :class:`mnet.checking.agreement.Agreement` explains)."""
    scale = largest_entry(ref)
    mine_leaves, ref_leaves = jax.tree_util.tree_leaves_with_path(mine), jax.tree_util.tree_leaves(ref)
    if len(mine_leaves) != len(ref_leaves):
        structures = f"{jax.tree_util.tree_structure(mine)} vs {jax.tree_util.tree_structure(ref)}"
        return RuleRow(rule, source, Agreement.of(np.nan, 0.0, 0.0), note=f"structure differs: {structures}")
    worst, worst_path = None, ""
    for (path, a), b in zip(mine_leaves, ref_leaves):
        if getattr(b, "dtype", None) == jax.dtypes.float0:
            continue
        if np.shape(a) != np.shape(b):
            return RuleRow(
                rule,
                source,
                Agreement.of(np.nan, 0.0, 0.0),
                jax.tree_util.keystr(path),
                f"shape {np.shape(a)} vs reference {np.shape(b)}",
            )
        agreement = Agreement.of(a, b, tolerance(jnp.float64), scale)
        if worst is None or (not agreement.ok, agreement.max_rel_error) > (not worst.ok, worst.max_rel_error):
            worst, worst_path = agreement, jax.tree_util.keystr(path) or "(value)"
    return RuleRow(rule, source, worst, worst_path)


def rule_source(layer: Any, rule: str, params: Any) -> str:
    if callable(getattr(layer, "walk", None)):
        return "walk"
    if own_rule(layer, rule) is not None:
        return "own"
    return "default" if not has_params(params) else "absent"


def random_input(layer: Any, shape: tuple[int, ...], rng: np.random.Generator) -> jax.Array:
    """A random batch for ``layer``: integer ids in range for a layer that takes ids (``input_vocab``), standard
    normal float64 otherwise."""
    vocab = getattr(layer, "input_vocab", None)
    if vocab is not None:
        return jnp.asarray(rng.integers(0, vocab, shape), jnp.int32)
    return jnp.asarray(rng.normal(size=shape), jnp.float64)


def perturbed(params: Any, rng: np.random.Generator) -> Any:
    """The floating leaves moved off their initial values by ``0.1`` times a standard normal draw, so that a
    zero-initialised bias cannot hide a wrong bias rule; integer leaves unchanged."""
    return jax.tree_util.tree_map(
        lambda p: (
            p + 0.1 * jnp.asarray(rng.normal(size=np.shape(p)), p.dtype)
            if jnp.issubdtype(jnp.asarray(p).dtype, jnp.floating)
            else p
        ),
        params,
    )
