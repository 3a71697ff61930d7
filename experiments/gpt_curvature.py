"""Curvature of a LLaMA-style decoder during training: a small ``mnet.models.gpt`` learns next characters of the
standard library's source with hand-derived gradients, and every few steps the experiment measures, block by block,
what autodiff makes slow:

* the trace of the GGN (the sum of its diagonal; a one-sample Monte-Carlo estimate, ``diag_ggn(mc_samples=1)``),
* the trace of the Hessian (Hutchinson: ``diag_hessian(hutchinson_samples=S)``, each probe one hand-derived
  Hessian-vector product), which can be negative where the loss is not convex,
* the distribution of per-example gradient norms (``per_example_grad_norms``, never materialising the gradients).

    python experiments/gpt_curvature.py [--steps 400] [--context 64] [--out experiments/out] [--quick]

Writes ``gpt_curvature.png`` (validation bits per character, the two traces per block, the norm distributions) and
``gpt_curvature.json``. ``--quick`` trains a few steps of a tiny model, for the tests.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mnet
from mnet.training import text
from mnet.training.steps import make_step

LOSS = mnet.losses.softmax_cross_entropy


def block_names(layers: int) -> list[str]:
    """The top-level entries of ``gpt``'s params, in order."""
    return [
        "embedding",
        *[f"{kind} {i + 1}" for i in range(layers) for kind in ("attention", "MLP")],
        "norm",
        "read-out",
    ]


def per_block_sums(tree) -> list[float]:
    """The sum of every leaf of each top-level entry (a trace, from a diagonal like the params)."""
    return [float(sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(entry))) for entry in tree]


def sample_windows(ids: np.ndarray, rng: np.random.Generator, count: int, context: int) -> tuple[np.ndarray, ...]:
    starts = rng.integers(0, len(ids) - context - 1, count)
    x = np.stack([ids[s : s + context] for s in starts])
    return x, np.stack([ids[s + 1 : s + context + 1] for s in starts])


def curvature_probe(net, probes: int):
    """``(GGN traces, Hessian traces, per-example norms)`` at ``(params, x, y, key)``, compiled once."""
    mc_ggn = mnet.diag_ggn(net, LOSS, mc_samples=1)
    hutchinson = mnet.diag_hessian(net, LOSS, hutchinson_samples=probes)
    norms = mnet.per_example_grad_norms(net, LOSS)

    @jax.jit
    def probe(params, x, y, key):
        ggn_key, hessian_key = jax.random.split(key)
        return mc_ggn(params, x, y, key=ggn_key), hutchinson(params, x, y, key=hessian_key), norms(params, x, y)

    return probe


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--every", type=int, default=50, help="steps between curvature measurements")
    parser.add_argument("--probes", type=int, default=8, help="Hutchinson probes per measurement")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("experiments/out"))
    parser.add_argument("--quick", action="store_true", help="a tiny model for a few steps: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.context, args.batch, args.layers, args.width, args.every, args.probes = 6, 16, 4, 1, 16, 3, 2

    train_ids, valid_ids, files = text.stdlib_corpus(100_000 if args.quick else None)
    print(f"standard library: {files} files, {len(train_ids):,} training characters; context {args.context}")
    net = mnet.models.gpt(text.VOCAB, args.context, args.width, args.layers, 4 if args.width >= 32 else 2,
                          num_kv_heads=2 if args.width >= 32 else 1, block_size=min(32, args.context))  # fmt: skip
    _, params = net.init(jax.random.key(args.seed), (args.context,), jnp.float32)
    optimizer = optax.adamw(args.lr, weight_decay=0.01)
    state = optimizer.init(params)
    step = jax.jit(make_step(mnet.value_and_grad(net, LOSS), optimizer))
    probe = curvature_probe(net, args.probes)
    rng = np.random.default_rng(args.seed)
    valid_x, valid_y = sample_windows(valid_ids, rng, 16, args.context)
    evaluate = jax.jit(lambda p: LOSS.value(net.apply(p, valid_x), valid_y) / math.log(2))
    names = block_names(args.layers)
    history: dict[str, list] = {"step": [], "valid_bits": [], "ggn_trace": [], "hessian_trace": [], "norms": []}

    def measure(number: int) -> None:
        x, y = sample_windows(train_ids, rng, args.batch, args.context)
        ggn, hessian, norms = probe(params, x, y, jax.random.key(number))
        history["step"].append(number)
        history["valid_bits"].append(float(evaluate(params)))
        history["ggn_trace"].append(per_block_sums(ggn))
        history["hessian_trace"].append(per_block_sums(hessian))
        history["norms"].append([float(n) for n in norms])
        print(f"step {number:>5}: validation {history['valid_bits'][-1]:.3f} bits/char, GGN trace "
              f"{sum(history['ggn_trace'][-1]):.3g}, Hessian trace {sum(history['hessian_trace'][-1]):.3g}, median "
              f"per-example gradient norm {np.median(history['norms'][-1]):.3g}", flush=True)  # fmt: skip

    measure(0)
    for number in range(1, args.steps + 1):
        x, y = sample_windows(train_ids, rng, args.batch, args.context)
        params, state, value = step(params, state, x, y)
        if not math.isfinite(float(value)):
            raise SystemExit(f"gpt_curvature: the loss diverged at step {number}")
        if number % args.every == 0 or number == args.steps:
            measure(number)

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"blocks": names, **history, "context": args.context, "probes": args.probes}
    (args.out / "gpt_curvature.json").write_text(json.dumps(result))
    plot(result, args.out / "gpt_curvature.png")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    steps = result["step"]
    axes[0].plot(steps, result["valid_bits"], "o-")
    axes[0].set(xlabel="step", ylabel="bits per character", title="validation")
    for index, name in enumerate(result["blocks"]):
        style = "-" if "attention" in name else "--" if "MLP" in name else ":"
        axes[1].plot(steps, [max(t[index], 1e-12) for t in result["ggn_trace"]], style, label=name)
        axes[2].plot(steps, [t[index] for t in result["hessian_trace"]], style, label=name)
    axes[1].set(xlabel="step", ylabel="trace", yscale="log", title="GGN trace per block (MC, 1 sample)")
    axes[2].set(xlabel="step", ylabel="trace", yscale="symlog", title=f"Hessian trace (Hutchinson, {result['probes']})")
    axes[2].legend(fontsize=7)
    for norms, step in ((result["norms"][0], steps[0]), (result["norms"][-1], steps[-1])):
        axes[3].hist(norms, bins=20, alpha=0.6, label=f"step {step}")
    axes[3].set(xlabel="per-example gradient norm", ylabel="examples", title="gradient norms")
    axes[3].legend(fontsize=7)
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
