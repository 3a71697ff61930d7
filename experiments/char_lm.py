"""A character-level language model over contexts of 1024 characters, trained with hand-derived gradients through
blockwise causal attention, on text every Python installation ships: the standard library's own source.

    python experiments/char_lm.py [--steps 3000] [--context 1024] [--out experiments/out] [--quick]

Data: the ``*.py`` files at the top of the running interpreter's standard library (``sysconfig``'s ``stdlib``
path), sorted by name; every tenth file is held out for validation, so no file is split between the two.
Characters: printable ASCII and newline (tabs become spaces, anything else one "unknown" symbol): 97 symbols.

Model: ``Embedding(97, 64)``, sinusoidal positions (a layer written here, as a user would), two pre-norm causal
transformer blocks (4 heads, attention in blocks of 128), ``LayerNorm``, ``Dense(97)`` at every position; the loss is the cross-entropy of every next character. AdamW with warm-up and cosine decay,
gradient norms clipped at 1. Reports validation bits per character against steps (a plot), a sample of generated
text, the time per step, and the temporary memory of one training step (XLA's memory analysis of the compiled
program) for this model by hand, for the same model with unblocked attention by hand, and under ``jax.grad``.
``--quick`` trains a few steps on short contexts, for the tests.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mnet
from mnet.compiled import compiled_memory
from mnet.training import text
from mnet.training.steps import make_step

LOSS = mnet.losses.softmax_cross_entropy
VOCAB = text.VOCAB
encode, decode, stdlib_corpus = text.encode, text.decode, text.stdlib_corpus


@dataclass(frozen=True)
class SinusoidalPositions:
    """A layer of the experiment's own (mnet takes any object with ``init``, ``forward`` and ``backward``): adds
    the sinusoidal position code of Vaswani et al. (2017), ``sin(t / 10000^(2i/D))`` and ``cos(...)`` in
    alternate features, to ``(batch, T, D)``. It has no parameters and its Jacobian is the identity, so its
    backward and forward-mode rules pass the (co)tangent through unchanged."""

    def init(self, key, input_shape):
        return tuple(input_shape), ()

    def forward(self, params, x):
        length, width = x.shape[-2:]
        angles = np.arange(length)[:, None] / 10000 ** (np.arange(0, width, 2) / width)[None, :]
        code = np.zeros((length, width))
        code[:, 0::2], code[:, 1::2] = np.sin(angles), np.cos(angles[:, : width // 2])
        return x + jnp.asarray(code, x.dtype), ()

    def backward(self, params, cache, dy):
        return (), dy

    def tangent(self, params, cache, dparams, dx):
        return dx


def language_model(context_block: int | None, width: int = 64, heads: int = 4, layers: int = 2) -> mnet.Serial:
    return mnet.serial(
        mnet.Embedding(VOCAB, width),
        SinusoidalPositions(),
        *[mnet.models.transformer_block(width, heads, causal=True, block_size=context_block) for _ in range(layers)],
        mnet.LayerNorm(),
        mnet.Dense(VOCAB),
    )


def windows(ids: np.ndarray, starts: np.ndarray, context: int) -> tuple[jax.Array, jax.Array]:
    """Inputs ``ids[s : s + context]`` and their next characters, one row per start."""
    rows = np.stack([ids[s : s + context + 1] for s in starts])
    return jnp.asarray(rows[:, :-1]), jnp.asarray(rows[:, 1:])


def step_memory(net_blockwise, net_unblocked, params, x, y) -> dict[str, int | str]:
    """Temporary bytes of one compiled training step per gradient path (nothing is run)."""
    optimizer = optax.adamw(1e-3)
    state = optimizer.init(params)
    paths = {
        "hand, blockwise attention": mnet.value_and_grad(net_blockwise, LOSS),
        "hand, unblocked attention": mnet.value_and_grad(net_unblocked, LOSS),
        "jax.grad, unblocked attention": mnet.autodiff_value_and_grad(net_unblocked, LOSS),
        "jax.grad, blockwise forward": mnet.autodiff_value_and_grad(net_blockwise, LOSS),
    }
    figures: dict[str, int | str] = {}
    for name, grad_fn in paths.items():
        compiled = jax.jit(make_step(grad_fn, optimizer)).lower(params, state, x, y).compile()
        memory = compiled_memory(compiled)
        figures[name] = memory if memory == "n/a" else memory["temp_bytes"]
    return figures


def generate(net, params, prompt: str, length: int, context: int, key: jax.Array, temperature: float = 0.8) -> str:
    """Sample ``length`` characters after ``prompt``: one fixed-size forward pass per character (the causal model
    ignores what lies after the position it predicts), the window sliding once it is full."""

    @jax.jit
    def next_id(buffer, position, key):
        logits = net.apply(params, buffer[None])[0, position] / temperature
        return jax.random.categorical(key, logits)

    ids = list(encode(prompt))
    for _ in range(length):
        window = ids[-context:]
        buffer = np.zeros(context, np.int32)
        buffer[: len(window)] = window
        key, draw = jax.random.split(key)
        ids.append(int(next_id(jnp.asarray(buffer), len(window) - 1, draw)))
    return decode(ids)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("experiments/out"))
    parser.add_argument("--quick", action="store_true", help="a few steps on contexts of 128: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.context, args.eval_every, args.block = 12, 128, 4, 32

    train_ids, valid_ids, n_files = stdlib_corpus(200_000 if args.quick else None)
    print(f"standard library sources: {n_files} files, {len(train_ids):,} training and {len(valid_ids):,} "
          f"validation characters; context {args.context}, batch {args.batch}")
    net = language_model(args.block)
    _, params = net.init(jax.random.key(args.seed), (args.context,), jnp.float32)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 20), args.steps, args.lr / 20)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    state = optimizer.init(params)
    step = jax.jit(make_step(mnet.value_and_grad(net, LOSS), optimizer))
    rng = np.random.default_rng(args.seed)
    valid_x, valid_y = windows(valid_ids, rng.integers(0, len(valid_ids) - args.context - 1, 16), args.context)
    evaluate = jax.jit(lambda p: LOSS.value(net.apply(p, valid_x), valid_y) / math.log(2))

    history: dict[str, list] = {"step": [0], "valid_bits": [float(evaluate(params))], "train_bits": []}
    seconds = []
    for number in range(1, args.steps + 1):
        x, y = windows(train_ids, rng.integers(0, len(train_ids) - args.context - 1, args.batch), args.context)
        start = time.perf_counter()
        params, state, value = step(params, state, x, y)
        value = float(value)
        seconds.append(time.perf_counter() - start)
        if not math.isfinite(value):
            raise SystemExit(f"char_lm: the loss diverged at step {number}")
        history["train_bits"].append(value / math.log(2))
        if number % args.eval_every == 0 or number == args.steps:
            history["step"].append(number)
            history["valid_bits"].append(float(evaluate(params)))
            print(f"step {number:>5}: train {history['train_bits'][-1]:.3f}, validation {history['valid_bits'][-1]:.3f} "
                  "bits/char", flush=True)
    step_seconds = float(np.median(seconds[1:])) if len(seconds) > 1 else seconds[0]

    sample = generate(net, params, "def ", 40 if args.quick else 400, args.context, jax.random.key(args.seed + 1))
    memory = step_memory(net, language_model(None), params, x, y)
    print(f"median time per step: {step_seconds * 1e3:.1f} ms ({jax.devices()[0].device_kind})")
    print("temporary memory of one training step (XLA's memory analysis):")
    for name, value in memory.items():
        print(f"  {name:<32} {value / 1e6:9.1f} MB" if isinstance(value, int) else f"  {name:<32} {value}")
    print("sample (temperature 0.8):\n" + sample)

    args.out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    train_steps = np.arange(1, len(history["train_bits"]) + 1)
    smooth = max(1, len(train_steps) // 50)
    train_curve = np.convolve(history["train_bits"], np.ones(smooth) / smooth, mode="valid")
    axis.plot(train_steps[smooth - 1 :], train_curve, color="0.6", label="training (moving mean)")
    axis.plot(history["step"], history["valid_bits"], "o-", color="C0", label="validation (held-out files)")
    axis.set_xlabel("step")
    axis.set_ylabel("bits per character")
    axis.set_title(f"char LM on the stdlib, context {args.context}, blockwise attention, hand gradients", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.out / "char_lm.png", dpi=110)
    plt.close(figure)
    return {"history": history, "sample": sample, "memory": memory, "step_seconds": step_seconds,
            "context": args.context}


if __name__ == "__main__":
    main()
