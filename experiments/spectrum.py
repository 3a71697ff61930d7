"""The Hessian's and the GGN's spectra of the digits MLP and CNN at the start, the middle and the end of training:
the spectral density (stochastic Lanczos quadrature), the top eigenvalues (Lanczos) and the trace (Hutch++), all on
mnet's hand-derived curvature products through ``mnet.spectrum``.

    python experiments/spectrum.py [--epochs 20] [--examples 512] [--seed 0] [--out experiments/out] [--quick]

Each network is trained with Adam on the bundled digits; at epoch 0, ``epochs / 2`` and ``epochs`` the curvature of
the mean loss over ``--examples`` training examples is analysed. Prints a table and writes ``spectrum.png`` (the
densities on a log scale, as PyHessian draws them); ``--quick`` is a smoke test.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mnet

LOSS = mnet.losses.softmax_cross_entropy
NETWORKS = {"MLP 64-64-10": lambda: mnet.mlp([64, 64, 10]), "CNN": lambda: mnet.models.digits_cnn()}


def spectra(net, x, y, curvature: str, probes: int, num_matvecs: int):
    """``f(params, key) -> (density, top eigenvalues, trace estimate, size)``, compiled once for every snapshot."""

    def analyse(params, key):
        operator = mnet.spectrum.curvature_operator(net, LOSS, params, x, y, curvature=curvature, batch_size=256)
        keys = jax.random.split(key, 3)
        density = mnet.spectrum.spectral_density(operator, key=keys[0], probes=probes, num_matvecs=num_matvecs)
        top = mnet.spectrum.top_eigenpairs(operator, 3, key=keys[1], num_matvecs=num_matvecs)
        trace = mnet.spectrum.trace(operator, key=keys[2], samples=3 * num_matvecs // 2, method="hutch++")
        return density, top.values, trace, operator.size

    return jax.jit(analyse)


def analyse(programs: dict, params, key) -> dict:
    found = {}
    for curvature, program in programs.items():
        start = time.perf_counter()
        density, top, trace, size = jax.block_until_ready(program(params, key))
        found[curvature] = {
            "density": density,
            "top": np.asarray(top),
            "trace": float(trace.value),
            "trace_error": float(trace.standard_error),
            "seconds": time.perf_counter() - start,
            "size": int(size),
        }
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("experiments/out"))
    parser.add_argument("--quick", action="store_true", help="2 epochs, 64 examples, short Lanczos: a smoke test")
    args = parser.parse_args(argv)
    epochs, examples = (2, 64) if args.quick else (args.epochs, args.examples)
    probes, num_matvecs = (2, 12) if args.quick else (6, 80)

    data = mnet.data.load_digits(args.seed)
    x, y = jnp.asarray(data.x_train[:examples]), jnp.asarray(data.y_train[:examples])
    results: dict = {}
    print(f"curvature of the mean loss over {examples} training digits; SLQ with {probes} probes x {num_matvecs} "
          f"Lanczos steps; Hutch++ with {3 * num_matvecs // 2} products")
    print(f"{'network':>14} {'epoch':>5} {'curvature':>9} {'top eigenvalues':>30} {'trace':>18} {'seconds':>8}"
          "  (the first snapshot's seconds include compiling)")
    for name, build in NETWORKS.items():
        net = build()
        _, params = net.init(jax.random.key(args.seed), data.example_shape, jnp.float32)
        results[name] = {}
        programs = {c: spectra(net, x, y, c, probes, num_matvecs) for c in ("hessian", "ggn")}
        for epoch in (0, epochs // 2, epochs):
            done = max(results[name]) if results[name] else 0
            if epoch > done:
                params = mnet.fit(net, LOSS, params, data, optimizer=optax.adam(1e-3), epochs=epoch - done,
                                  batch_size=32, seed=args.seed + epoch).params
            results[name][epoch] = analyse(programs, params, jax.random.key(args.seed + epoch))
            for curvature, r in results[name][epoch].items():
                top = " ".join(f"{v:9.4g}" for v in r["top"])
                trace = f"{r['trace']:.4g} ± {r['trace_error']:.2g}"
                print(f"{name:>14} {epoch:>5} {curvature:>9} {top:>30} {trace:>18} {r['seconds']:8.1f}")
    plot(results, args.out / "spectrum.png")
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(results), 2, figsize=(11, 3.6 * len(results)), squeeze=False)
    for row, (name, snapshots) in enumerate(results.items()):
        for column, curvature in enumerate(("hessian", "ggn")):
            axis = axes[row, column]
            for epoch, found in snapshots.items():
                density = found[curvature]["density"]
                axis.semilogy(np.asarray(density.grid), np.maximum(np.asarray(density.density), 1e-8),
                              label=f"epoch {epoch} (top {found[curvature]['top'][0]:.3g})")
            axis.set(xlabel="eigenvalue", ylabel="density", ylim=(1e-6, None),
                     title=f"{name}: {'Hessian' if curvature == 'hessian' else 'GGN'} "
                           f"({found[curvature]['size']} parameters)")
            axis.legend(fontsize=8)
            axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
