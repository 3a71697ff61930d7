"""What :func:`mnet.compare_gradients` and :func:`mnet.compare_jvp` report: one row per parameter leaf, one per
unit of the network, the verdict, a table and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from mnet.checking.agreement import (
    FINITE_DIFFERENCE_TOLERANCE,
    Agreement,
    tolerance,
)
from mnet.core.protocol import LayerProtocol

Layer = LayerProtocol


@dataclass(frozen=True)
class LeafRow:
    """One parameter leaf: hand-derived vs autodiff, and each vs finite differences when computed."""

    path: str
    shape: tuple[int, ...]
    autodiff: Agreement
    finite_differences: Agreement | None = None
    autodiff_vs_finite_differences: Agreement | None = None
    differenced: str = ""

    @property
    def ok(self) -> bool:
        checks = (self.autodiff, self.finite_differences, self.autodiff_vs_finite_differences)
        return all(check.ok for check in checks if check is not None)


@dataclass(frozen=True)
class LayerRow:
    """One layer's ``backward`` against ``jax.vjp`` of its ``apply`` at the actual activations and cotangent."""

    position: str
    layer: str
    parts: dict[str, Agreement]

    @property
    def ok(self) -> bool:
        return all(part.ok for part in self.parts.values())

    @property
    def wrong_parts(self) -> list[str]:
        return [name for name, part in self.parts.items() if not part.ok]


@dataclass(frozen=True)
class GradientReport:
    """The outcome of :func:`compare_gradients`.

    Attributes:
        rows: one :class:`LeafRow` per parameter leaf, named by its path (``[2]['W']``).
        layers: one :class:`LayerRow` per unit (serial, residual and parallel blocks are walked into).
        value, reference_value: the loss by the hand-derived path and by autodiff.
        dtype: the dtype of the parameters.
        ok: every row and every layer within tolerance.
    """

    rows: tuple[LeafRow, ...]
    layers: tuple[LayerRow, ...]
    value: float
    reference_value: float
    dtype: str
    finite_differences: bool = False
    notes: tuple[str, ...] = field(default=())
    kind: str = "gradient"  # "tangent" for compare_jvp: value is then the output tangent's norm

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows) and all(layer.ok for layer in self.layers)

    @property
    def first_wrong_layer(self) -> LayerRow | None:
        """The first layer (in forward order) whose own rule disagrees with ``jax.vjp``, or None."""
        return next((layer for layer in self.layers if not layer.ok), None)

    def to_dict(self) -> dict:
        """Plain data (JSON-serialisable): every row and layer with its numbers and verdicts."""

        def agreement(a: Agreement | None):
            return None if a is None else {**asdict(a), "ok": a.ok}

        return {
            "ok": self.ok,
            "dtype": self.dtype,
            "value": self.value,
            "reference_value": self.reference_value,
            "finite_differences": self.finite_differences,
            "kind": self.kind,
            "leaves": [
                {
                    "path": row.path,
                    "shape": list(row.shape),
                    "ok": row.ok,
                    "autodiff": agreement(row.autodiff),
                    "finite_differences": agreement(row.finite_differences),
                    "autodiff_vs_finite_differences": agreement(row.autodiff_vs_finite_differences),
                    "differenced": row.differenced,
                }
                for row in self.rows
            ],
            "layers": [
                {
                    "position": layer.position,
                    "layer": layer.layer,
                    "ok": layer.ok,
                    "parts": {name: agreement(part) for name, part in layer.parts.items()},
                }
                for layer in self.layers
            ],
            "first_wrong_layer": None if self.first_wrong_layer is None else self.first_wrong_layer.position,
            "notes": list(self.notes),
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        return "\n".join(self._table() + [""] + self._summary())

    def _table(self) -> list[str]:
        """One line per leaf, the columns aligned."""
        header = ["leaf", "shape", "max abs err", "max rel err", "cosine", "|hand|", "|autodiff|"]
        if self.finite_differences:
            header += ["rel err vs FD", "autodiff vs FD"]
        header.append("")
        table = [header]
        for row in self.rows:
            a = row.autodiff
            line = [
                row.path,
                "x".join(map(str, row.shape)) or "()",
                f"{a.max_abs_error:.2e}",
                f"{a.max_rel_error:.2e}",
                f"{a.cosine:.9f}",
                f"{a.norm:.4e}",
                f"{a.reference_norm:.4e}",
            ]
            if self.finite_differences:
                assert row.finite_differences and row.autodiff_vs_finite_differences
                line += [
                    f"{row.finite_differences.max_rel_error:.2e}",
                    f"{row.autodiff_vs_finite_differences.max_rel_error:.2e}",
                ]
            line.append("ok" if row.ok else "MISMATCH")
            table.append(line)
        widths = [max(len(line[i]) for line in table) for i in range(len(header))]
        lines = [
            "  ".join(
                cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))
            ).rstrip()
            for line in table
        ]
        lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
        return lines

    def _summary(self) -> list[str]:
        """The tolerance, every wrong unit, the notes and the verdict."""
        first = self.rows[0].autodiff.tolerance if self.rows else tolerance(self.dtype)
        gradient = self.kind == "gradient"
        summary = [
            ("loss" if gradient else "|output tangent|")
            + f" {self.value:.10g} (autodiff {self.reference_value:.10g}); dtype {self.dtype}; "
            f"tolerance {first:.1e} relative to each leaf's largest entry"
            + (
                f", {FINITE_DIFFERENCE_TOLERANCE:.0e} against float64 finite differences"
                if self.finite_differences
                else ""
            )
        ]
        wrong = [layer for layer in self.layers if not layer.ok]
        for layer in wrong:
            summary.append(
                f"layer {layer.position} {layer.layer}: its "
                + ("backward disagrees with jax.vjp" if gradient else "tangent disagrees with jax.jvp")
                + " in "
                + ", ".join(f"{name} (rel err {layer.parts[name].max_rel_error:.2e})" for name in layer.wrong_parts)
            )
        summary.extend(self.notes)
        plural = "gradients" if gradient else "tangents"
        summary.append(
            f"{plural} agree"
            if self.ok
            else (
                f"{plural} DISAGREE; the first wrong layer is {wrong[0].position} {wrong[0].layer}"
                if wrong
                else f"{plural} DISAGREE"
            )
        )
        return summary
