"""How each curvature quantity's cost grows with the batch, the width and the depth of an MLP, as a multiple of its
own framework's gradient step, for mnet, JAX's autodiff and the PyTorch peers (``mnet bench --peers``' contenders).

    python experiments/peer_scaling.py [--rounds 5] [--out experiments/out] [--quick]

Three sweeps around the ``--peers`` row P1 (MLP 784-512-512-10, ReLU, batch 128): the batch from 32 to 1024, the
width of both hidden layers from 128 to 2048, and the depth from 1 to 4 hidden layers of 512. Each configuration
times its contenders interleaved in one process (:func:`mnet.bench.timing.interleaved_medians`); the agreement of
every contender with mnet is the row P1's, checked by ``mnet bench --peers`` and the tests, not repeated here. The
per-example contenders of autodiff, Opacus and torch.func (tens to hundreds of gradients) are left out. Writes
``peer_scaling.json`` and ``peer_scaling.png`` (a panel per sweep, a line per contender); ``--quick`` is a smoke
test of a few tiny configurations.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mnet.bench import peer_quantities, peers, versus
from mnet.bench.timing import interleaved_medians

#: The contenders followed through the sweeps: each quantity's mnet and its cheapest peers.
FOLLOWED = {
    "diag GGN exact": ("mnet", "BackPACK DiagGGNExact"),
    "diag GGN MC(1)": ("mnet", "BackPACK DiagGGNMC"),
    "KFLR factors": ("mnet", "BackPACK KFLR", "curvlinops KFAC (type-2)"),
    "KFAC factors MC(1)": ("mnet", "BackPACK KFAC", "curvlinops KFAC (mc)"),
    "per-example norms": ("mnet", "BackPACK BatchL2Grad"),
    "GGN-vector product": ("mnet", "jax.jvp + jax.vjp", "curvlinops"),
    "Hessian-vector product": ("mnet", "jax.jvp of jax.grad", "curvlinops"),
}


def sweeps(quick: bool) -> dict[str, list[tuple[int, list[int], int]]]:
    """Per sweep, its configurations ``(value, widths, batch)``."""
    if quick:
        return {
            "batch": [(b, [784, 32, 10], b) for b in (8, 16)],
            "width": [(w, [784, w, 10], 8) for w in (16, 32)],
            "depth": [(d, [784] + [32] * d + [10], 8) for d in (1, 2)],
        }
    return {
        "batch": [(b, [784, 512, 512, 10], b) for b in (32, 128, 512, 1024)],
        "width": [(w, [784, w, w, 10], 128) for w in (128, 512, 1024, 2048)],
        "depth": [(d, [784] + [512] * d + [10], 128) for d in (1, 2, 4)],
    }


def measure(widths: list[int], batch: int, rounds: int, available: dict) -> tuple[dict, dict]:
    """Each followed contender's time as a multiple of its own framework's gradient step, and each framework's
    gradient step in seconds."""
    problem = peers.mlp_problem(widths, batch)
    followed = {
        quantity: {name: entry for name, entry in found.items() if name in FOLLOWED.get(quantity, ())}
        for quantity, found in peer_quantities.mlp_quantities(problem, available).items()
    }
    contenders = versus.named_contenders(problem, followed, available)
    with versus.quiet_hooks():
        seconds = interleaved_medians({name: entry[1].call for name, entry in contenders.items()}, rounds)
    gradients = {name: seconds[name] for name in contenders if name.startswith("gradient · ")}
    multiples = {
        name: seconds[name] / seconds[peer_quantities.OWN_GRADIENT[framework]]
        for name, (framework, _) in contenders.items()
        if name not in gradients
    }
    return multiples, gradients


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("experiments/out"))
    parser.add_argument("--quick", action="store_true", help="tiny configurations, one round: a smoke test")
    args = parser.parse_args(argv)
    available = peers.availability()
    skipped = {peer: reason for peer, reason in available.items() if reason.startswith("skipped")}
    for peer, reason in skipped.items():
        print(f"{peer} {reason}")
    rounds = 1 if args.quick else args.rounds
    results: dict = {"peers": available, "sweeps": {}}
    for sweep, configurations in sweeps(args.quick).items():
        results["sweeps"][sweep] = {}
        for value, widths, batch in configurations:
            multiples, gradients = measure(widths, batch, rounds, available)
            results["sweeps"][sweep][value] = {
                "widths": widths,
                "batch": batch,
                "multiples": multiples,
                "gradient_seconds": gradients,
            }
            steps = ", ".join(f"{name.split(' · ')[1]} {s * 1e3:.2f} ms" for name, s in gradients.items())
            print(f"{sweep} {value} (MLP {'-'.join(map(str, widths))}, batch {batch}): gradient {steps}")
            for name, multiple in multiples.items():
                print(f"    {name:<50} {multiple:7.2f} gradients")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peer_scaling.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "peer_scaling.png")
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    sweeps_ = results["sweeps"]
    figure, axes = plt.subplots(
        len(FOLLOWED), len(sweeps_), figsize=(4.2 * len(sweeps_), 2.6 * len(FOLLOWED)), squeeze=False
    )
    labels = {"batch": "batch", "width": "hidden width", "depth": "hidden layers of 512"}
    for column, (sweep, configurations) in enumerate(sweeps_.items()):
        values = [int(v) for v in configurations]  # ints, also when read back from the JSON
        for row, (quantity, followed) in enumerate(FOLLOWED.items()):
            axis = axes[row, column]
            for contender in followed:
                name = f"{quantity} · {contender}"
                points = [(int(v), c["multiples"][name]) for v, c in configurations.items() if name in c["multiples"]]
                if points:
                    axis.plot([p[0] for p in points], [p[1] for p in points], "o-", label=contender)
            axis.set(xscale="linear" if sweep == "depth" else "log", xlabel=labels[sweep], ylim=(0, None))
            axis.set(ylabel="own gradients", title=quantity if column == 0 else "")
            axis.xaxis.set_minor_locator(NullLocator())  # the sweep's own values only, no log-scale minor labels
            axis.set_xticks(values, [str(v) for v in values])
            axis.legend(fontsize=7)
            axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
