"""Benchmarks: hand-derived against autodiff (and optional other frameworks), side by side in one process.

Method: every contender is compiled and warmed up first; then the contenders of a row are timed in turn,
round after round (interleaved, so drift and noise hit all of them alike), each sample preceded by one untimed
call and long enough (calibrated number of calls) that dispatch overhead does not dominate, and each reports
the median of its rounds. Throughput is set against the machine's float32 matmul peak measured in the same run: the
best GFLOP/s of jitted square products of several sizes, each the fastest of its samples (:func:`matmul_peak`). Like :mod:`mnet.check`, this module calls ``jax.grad``: autodiff is a contender.
"""

from __future__ import annotations

import contextvars
import functools
import math
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mnet import derivatives, models
from mnet.backprop import value_and_grad
from mnet.check import NOT_AVAILABLE, compiled_memory
from mnet.layers.base import LayerProtocol as Layer
from mnet.layers.base import apply_layer, batch_sq_norms
from mnet.losses import softmax_cross_entropy
from mnet.models import mlp
from mnet.reference import autodiff_value_and_grad
from mnet.train import make_step


@dataclass
class Row:
    """One workload: its contenders' median seconds per call, and derived figures."""

    name: str
    description: str
    seconds: dict[str, float]
    baseline: str
    extra: dict = field(default_factory=dict)
    #: Each contender's XLA memory analysis (:func:`mnet.check.compiled_memory`): ``temp_bytes`` and
    #: ``peak_bytes``, or "n/a" (a contender that is not one compiled program, or a backend without the analysis).
    memory: dict = field(default_factory=dict)

    def ratios(self) -> dict[str, float]:
        """Each contender's speed-up over the baseline (baseline time / contender time)."""
        base = self.seconds[self.baseline]
        return {name: base / s for name, s in self.seconds.items()}


#: Each timing sample lasts at least this long (as timeit's autorange): a single call of a millisecond-scale
#: function is dominated by dispatch and synchronisation, which once inflated a 2.7 ms function to 6 ms.
SAMPLE_SECONDS = 0.02


def interleaved_samples(
    contenders: Mapping[str, Callable[[], object]], rounds: int, number: int | None = None
) -> dict[str, list[float]]:
    """Seconds per call of each contender, one sample per round, the contenders interleaved round by round.

    Each sample times ``number`` back-to-back calls; by default ``number`` is calibrated per contender so that
    a sample lasts at least :data:`SAMPLE_SECONDS`.
    """
    numbers = {}
    contenders = {name: _ahead_of_time(name, fn) for name, fn in contenders.items()}
    for name, fn in contenders.items():  # compile, warm up, calibrate
        jax.block_until_ready(fn())
        start = time.perf_counter()
        jax.block_until_ready(fn())
        once = time.perf_counter() - start
        numbers[name] = number or max(1, min(1000, math.ceil(SAMPLE_SECONDS / max(once, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            # One untimed call first: the contender before may have left caches and the allocator in a state
            # (a vmap(jax.grad) writing 690 MB of per-example gradients once nearly doubled the next one's time).
            jax.block_until_ready(fn())
            start = time.perf_counter()
            for _ in range(numbers[name]):
                out = fn()
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - start) / numbers[name])
    return samples


#: While a row runs (:func:`run`), the memory analysis of every contender it times, by name.
_ROW_MEMORY: contextvars.ContextVar[dict | None] = contextvars.ContextVar("row_memory", default=None)


def _ahead_of_time(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    """A contender that calls a jitted function on fixed arguments, compiled ahead of time so that XLA's memory
    analysis of exactly the program being timed is read without compiling it twice; it is recorded for the row
    being run. Any other contender (a Python loop, another framework) is timed as it is, its memory "n/a"."""
    memory: dict[str, int | str] = dict(NOT_AVAILABLE)
    timed = fn
    if isinstance(fn, functools.partial) and hasattr(fn.func, "lower"):
        try:
            compiled = fn.func.lower(*fn.args, **fn.keywords).compile()
            candidate = functools.partial(compiled, *fn.args, **fn.keywords)
            jax.block_until_ready(candidate())
            memory, timed = compiled_memory(compiled), candidate
        except Exception:  # static arguments or donation the executable cannot take: time the jitted call
            pass
    recorder = _ROW_MEMORY.get()
    if recorder is not None:
        recorder[name] = memory
    return timed


def with_memory(plan: Callable[[], Row]) -> Row:
    """Run one row's plan, then attach the memory analysis of each of its contenders: what the row set itself, else
    what its timing recorded, else "n/a" (a contender that is no single compiled program, such as a Python loop of
    steps or another framework)."""
    token = _ROW_MEMORY.set({})
    try:
        row = plan()
        recorded = _ROW_MEMORY.get() or {}
    finally:
        _ROW_MEMORY.reset(token)
    row.memory = {name: row.memory.get(name, recorded.get(name, NOT_AVAILABLE)) for name in row.seconds}
    return row


def interleaved_medians(
    contenders: Mapping[str, Callable[[], object]], rounds: int, number: int | None = None
) -> dict[str, float]:
    """Median seconds per call of each contender (:func:`interleaved_samples`)."""
    return {name: statistics.median(values) for name, values in interleaved_samples(contenders, rounds, number).items()}


#: Square matmul sizes whose best throughput is the machine's peak (a single 2048^3 product once measured 188
#: GFLOP/s while a training step's smaller products reached 206: one size and a median is no peak).
PEAK_SIZES = (512, 1024, 1536, 2048)


def matmul_peak(sizes: tuple[int, ...] = PEAK_SIZES, rounds: int = 10, dtype=jnp.float32) -> dict[int, float]:
    """GFLOP/s of a jitted ``n x n x n`` product (``2 n^3`` flops) for each size: the fastest of ``rounds`` samples,
    the sizes interleaved. The peak is the largest of them."""
    products: dict[str, Callable[[], object]] = {}
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        products[str(n)] = functools.partial(jax.jit(jnp.matmul), a, b)
    samples = interleaved_samples(products, rounds)
    return {int(n): 2 * int(n) ** 3 / min(values) / 1e9 for n, values in samples.items()}


def mlp_problem(widths: list[int], batch: int, seed: int = 0, dtype=jnp.float32, compute_dtype: str | None = None):
    """An MLP of ``widths`` (ReLU between layers) with its parameters, a random normal batch and integer labels;
    products in ``compute_dtype`` when given (mixed precision)."""
    net = mlp(widths[1:], compute_dtype=compute_dtype)
    _, params = net.init(jax.random.key(seed), (widths[0],), dtype)
    x = jax.random.normal(jax.random.key(seed + 1), (batch, widths[0]), dtype)
    labels = jax.random.randint(jax.random.key(seed + 2), (batch,), 0, widths[-1])
    return net, params, x, labels


def _weights(widths: list[int]) -> int:
    return sum(a * b for a, b in zip(widths, widths[1:]))


def _train_step(grad_fn, lr: float = 1e-2):
    optimizer = optax.sgd(lr)
    return optimizer, make_step(grad_fn, optimizer)


def _hand_and_autodiff(net: Layer) -> dict[str, Callable]:
    """The two gradient functions every training row compares, by their contender names."""
    return {
        "hand": value_and_grad(net, softmax_cross_entropy),
        "jax.grad": autodiff_value_and_grad(net, softmax_cross_entropy),
    }


def _vmapped_autodiff_grads(net: Layer):
    """The reference for per-example work: ``jax.grad`` of each example's loss, vmapped over the batch."""
    one = lambda p, xb, yb: softmax_cross_entropy.value(apply_layer(net, p, xb[None]), yb[None])  # noqa: E731
    return jax.vmap(jax.grad(one), in_axes=(None, 0, 0))


def step_contenders(net: Layer, params, x, y) -> dict[str, Callable[[], object]]:
    """One jitted SGD training step of ``net`` on ``(x, y)`` (softmax cross-entropy) per gradient path,
    hand-derived and ``jax.grad``, each as a call with no arguments (compiled on first call)."""
    contenders: dict[str, Callable[[], object]] = {}
    for label, grad_fn in _hand_and_autodiff(net).items():
        optimizer, step = _train_step(grad_fn)
        jitted = jax.jit(step)
        state = optimizer.init(params)
        contenders[label] = functools.partial(jitted, params, state, x, y)
    return contenders


def step_seconds(net: Layer, params, x, y, rounds: int) -> dict[str, float]:
    """Median seconds of :func:`step_contenders`, interleaved."""
    return interleaved_medians(step_contenders(net, params, x, y), rounds)


def describe_step_seconds(seconds: dict[str, float], batch: int, rounds: int) -> str:
    """One line for the experiments: the :func:`step_seconds` of both contenders and their ratio."""
    return (
        f"time per SGD step, batch {batch} (median of {rounds} interleaved samples on {jax.devices()[0].device_kind}): "
        + ", ".join(f"{name} {s * 1e3:.3f} ms" for name, s in seconds.items())
        + f"; hand / jax.grad = {seconds['hand'] / seconds['jax.grad']:.2f}"
    )


def cnn_problem(batch: int) -> tuple[Any, Any, jax.Array, jax.Array]:
    """:func:`mnet.models.digits_cnn` with its parameters, a random batch of flat 8x8 images and labels."""
    net = models.digits_cnn()
    _, params = net.init(jax.random.key(0), (64,), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (batch, 64), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    return net, params, x, y


def transformer_problem(batch: int, length: int) -> tuple[Any, Any, jax.Array, jax.Array]:
    """:func:`mnet.models.transformer_classifier` (one block, width 32, 4 heads, 16 tokens and classes) with its
    parameters, random token ids and labels."""
    net = models.transformer_classifier(vocab=16, classes=16)
    _, params = net.init(jax.random.key(0), (length,), jnp.float32)
    ids = jax.random.randint(jax.random.key(1), (batch, length), 0, 16)
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 16)
    return net, params, ids, y


def row_cnn_step(batch: int, rounds: int) -> Row:
    """One training step of :func:`mnet.models.digits_cnn` on a batch of 8x8 images."""
    return Row(
        "C1",
        f"training step, digits CNN (2 conv + 2 max-pool + 2 dense), batch {batch}, float32",
        step_seconds(*cnn_problem(batch), rounds),
        "jax.grad",
        {},
    )


def row_transformer_step(batch: int, length: int, rounds: int) -> Row:
    """One training step of :func:`mnet.models.transformer_classifier` (one block, width 32, 4 heads)."""
    return Row(
        "T1",
        f"training step, transformer block (width 32, 4 heads), batch {batch}, length {length}, float32",
        step_seconds(*transformer_problem(batch, length), rounds),
        "jax.grad",
        {},
    )


def row_training_step(
    widths: list[int], batch: int, rounds: int, compute_dtype: str | None = None, name: str = "W1"
) -> Row:
    """One SGD training step (forward, backward, update), hand-derived vs ``jax.grad``; float32 parameters,
    products in ``compute_dtype`` (mixed precision) when given."""
    net, params, x, y = mlp_problem(widths, batch, compute_dtype=compute_dtype)
    seconds = step_seconds(net, params, x, y, rounds)
    flops = 6 * batch * _weights(widths)
    precision = f"{compute_dtype} compute, float32 params" if compute_dtype else "float32"
    extra = {
        "gflops_per_s": {k: flops / s / 1e9 for k, s in seconds.items()},
        "flops_per_step": flops,
        "precision": precision,
    }
    return Row(
        name, f"training step, MLP {'-'.join(map(str, widths))}, batch {batch}, {precision}", seconds, "jax.grad", extra
    )


def row_fused_training(widths: list[int], batch: int, steps: int, rounds: int) -> Row:
    """``steps`` SGD steps: fused in one ``lax.scan`` (hand and autodiff) vs a Python loop of jitted steps."""
    net, params, x, y = mlp_problem(widths, batch)
    pair = _hand_and_autodiff(net)
    contenders: dict[str, Callable[[], object]] = {}
    for label, grad_fn in pair.items():
        optimizer, step = _train_step(grad_fn)

        def run(params, state, step=step):
            def body(carry, _):
                p, s, _ = step(*carry, x, y)
                return (p, s), None

            (params, state), _ = jax.lax.scan(body, (params, state), None, length=steps)
            return params

        jitted = jax.jit(run)
        state = optimizer.init(params)
        contenders[f"{label} scan"] = functools.partial(jitted, params, state)
    optimizer, step = _train_step(pair["hand"])
    jitted_step = jax.jit(step)

    def python_loop():
        p, s = params, optimizer.init(params)
        for _ in range(steps):
            p, s, _ = jitted_step(p, s, x, y)
        return p

    contenders["hand python loop"] = python_loop
    torch_loop = _torch_training_loop(widths, batch, steps)
    if torch_loop is not None:
        contenders["pytorch eager loop"] = torch_loop
    seconds = interleaved_medians(contenders, rounds)
    extra = {"steps_per_s": {k: steps / s for k, s in seconds.items()}}
    return Row(
        "W2",
        f"{steps} training steps, MLP {'-'.join(map(str, widths))}, batch {batch}",
        seconds,
        "hand python loop",
        extra,
    )


def _torch_training_loop(widths: list[int], batch: int, steps: int):
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(batch, widths[0])
    y = torch.randint(0, widths[-1], (batch,))

    def loop():
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        return jnp.zeros(())

    return loop


def row_compile_time(widths: list[int], batch: int, rounds: int) -> Row:
    """Seconds to lower and compile the jitted training step (fresh each round, caches cleared)."""
    net, params, x, y = mlp_problem(widths, batch)
    samples: dict[str, list[float]] = {"hand": [], "jax.grad": []}
    memory = {}
    for _ in range(rounds):
        for label, grad_fn in _hand_and_autodiff(net).items():
            optimizer, step = _train_step(grad_fn)
            jax.clear_caches()
            start = time.perf_counter()
            compiled = jax.jit(step).lower(params, optimizer.init(params), x, y).compile()
            samples[label].append(time.perf_counter() - start)
            memory[label] = compiled_memory(compiled)
    seconds = {k: statistics.median(v) for k, v in samples.items()}
    return Row("W3", f"compile the training step, MLP {'-'.join(map(str, widths))}", seconds, "jax.grad", memory=memory)


def row_per_example_norms(widths: list[int], batch: int, rounds: int) -> Row:
    net, params, x, y = mlp_problem(widths, batch)
    hand = jax.jit(derivatives.per_example_grad_norms(net, softmax_cross_entropy))
    reference = _vmapped_autodiff_grads(net)
    auto = jax.jit(lambda p, x, y: jnp.sqrt(batch_sq_norms(reference(p, x, y), batch, x.dtype)))
    seconds = interleaved_medians(
        {"hand": functools.partial(hand, params, x, y), "vmap(jax.grad)": functools.partial(auto, params, x, y)}, rounds
    )
    return Row(
        "D1", f"per-example gradient norms, MLP {'-'.join(map(str, widths))}, batch {batch}", seconds, "vmap(jax.grad)"
    )


def row_per_example_grads(widths: list[int], batch: int, rounds: int) -> Row:
    net, params, x, y = mlp_problem(widths, batch)
    hand = jax.jit(derivatives.per_example_grads(net, softmax_cross_entropy))
    auto = jax.jit(_vmapped_autodiff_grads(net))
    seconds = interleaved_medians(
        {"hand": functools.partial(hand, params, x, y), "vmap(jax.grad)": functools.partial(auto, params, x, y)}, rounds
    )
    return Row(
        "D2", f"per-example gradients, MLP {'-'.join(map(str, widths))}, batch {batch}", seconds, "vmap(jax.grad)"
    )


def row_ntk(widths: list[int], batch: int, rounds: int, name: str, forward_mode: bool = True) -> Row:
    """The kernel by the layer-structured formula vs contracting autodiff Jacobians. ``forward_mode`` adds
    ``jax.jacfwd`` (one tangent per parameter: minutes at width 512, so left out there)."""
    net, params, x, _ = mlp_problem(widths, batch)
    x2 = x[::-1] + 0.1
    hand = jax.jit(derivatives.ntk(net))
    contract = derivatives.contract_jacobians
    via_jacrev = jax.jit(lambda p, a, b: contract(jax.jacrev(net.apply)(p, a), jax.jacrev(net.apply)(p, b)))
    contenders = {
        "hand": functools.partial(hand, params, x, x2),
        "jacrev contraction": functools.partial(via_jacrev, params, x, x2),
    }
    if forward_mode:
        via_jacfwd = jax.jit(lambda p, a, b: contract(jax.jacfwd(net.apply)(p, a), jax.jacfwd(net.apply)(p, b)))
        contenders["jacfwd contraction"] = functools.partial(via_jacfwd, params, x, x2)
    seconds = interleaved_medians(contenders, rounds)
    return Row(
        name, f"empirical NTK, MLP {'-'.join(map(str, widths))}, batch {batch} x {batch}", seconds, "jacrev contraction"
    )


def row_jacobian(widths: list[int], batch: int, rounds: int, forward_mode: bool = True) -> Row:
    net, params, x, _ = mlp_problem(widths, batch)
    hand = jax.jit(derivatives.jacobian(net))
    rev = jax.jit(jax.jacrev(net.apply))
    contenders = {"hand": functools.partial(hand, params, x), "jax.jacrev": functools.partial(rev, params, x)}
    if forward_mode:
        fwd = jax.jit(jax.jacfwd(net.apply))
        contenders["jax.jacfwd"] = functools.partial(fwd, params, x)
    seconds = interleaved_medians(contenders, rounds)
    return Row(
        "D4", f"output-parameter Jacobian, MLP {'-'.join(map(str, widths))}, batch {batch}", seconds, "jax.jacrev"
    )


def machine() -> dict:
    devices = jax.devices()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in devices],
    }


def run(quick: bool = False, only: set[str] | None = None, large: bool = False) -> dict:
    """Run the suite. ``quick`` shrinks sizes and repetitions so that it finishes in seconds (a smoke test);
    ``large`` adds the accelerator-sized training step (MLP 4096-4096-4096-4096, batch 4096, float32 and bfloat16)."""
    r = 3 if quick else 30
    plans: dict[str, Callable[[], Row]] = {
        "W1": lambda: row_training_step(
            [784, 128, 128, 10] if quick else [784, 1024, 1024, 10], 64 if quick else 256, r
        ),
        "W1bf16": lambda: row_training_step(
            [784, 128, 128, 10] if quick else [784, 1024, 1024, 10], 64 if quick else 256, r, "bfloat16", "W1bf16"
        ),
        "W2": lambda: row_fused_training([64, 32, 10], 64, 50 if quick else 1000, r if quick else 15),
        "W3": lambda: row_compile_time([784, 128, 10] if quick else [784, 1024, 1024, 10], 32, 2 if quick else 5),
        "D1": lambda: row_per_example_norms([784, 64, 10] if quick else [784, 512, 512, 10], 32 if quick else 256, r),
        "D2": lambda: row_per_example_grads([784, 64, 10] if quick else [784, 512, 512, 10], 32 if quick else 256, r),
        "D3": lambda: row_ntk([32, 64, 64, 8], 16, r, "D3", forward_mode=not quick),
        "D3w": lambda: row_ntk(
            [32, 128, 128, 8] if quick else [32, 512, 512, 8], 16, 3 if quick else 7, "D3w", forward_mode=False
        ),
        "D4": lambda: row_jacobian([32, 64, 64, 8], 16, r, forward_mode=not quick),
        "C1": lambda: row_cnn_step(16 if quick else 128, r),
        "T1": lambda: row_transformer_step(16 if quick else 128, 9, r),
    }
    from mnet import bench_curvature, bench_memory  # their rows build on this module's helpers

    plans.update(bench_curvature.plans(quick, r))
    plans.update(bench_memory.plans(quick, r))
    if large:
        plans["L1"] = lambda: row_training_step([4096, 4096, 4096, 4096], 4096, 10, None, "L1")
        plans["L1bf16"] = lambda: row_training_step([4096, 4096, 4096, 4096], 4096, 10, "bfloat16", "L1bf16")
    unknown = sorted((only or set()) - set(plans))
    if unknown:
        raise ValueError(f"unknown benchmark row(s) {', '.join(unknown)}; known: {', '.join(plans)}")
    rows = [with_memory(plan) for name, plan in plans.items() if only is None or name in only]
    peaks = matmul_peak((128, 256, 512) if quick else PEAK_SIZES, 3 if quick else 10)
    return {
        "machine": machine(),
        "matmul_peak_gflops": max(peaks.values()),
        "matmul_peak_by_size": {str(n): g for n, g in peaks.items()},
        "quick": quick,
        "rows": [{**asdict(row), "ratios": row.ratios()} for row in rows],
    }


def contender_figures(row: dict, name: str, peak: float) -> tuple[str, str]:
    """``(median time, throughput note)`` of one contender of a result row, as both renderings show them."""
    seconds = row["seconds"][name]
    note = ""
    if "gflops_per_s" in row["extra"]:
        g = row["extra"]["gflops_per_s"][name]
        note = f"{g:.1f} GFLOP/s = {g / peak:.0%} of peak"
    elif "steps_per_s" in row["extra"]:
        note = f"{row['extra']['steps_per_s'][name]:,.0f} steps/s"
    return (f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.3f} s"), note


def format_table(result: dict) -> str:
    peak = result["matmul_peak_gflops"]
    lines = [
        f"machine: {result['machine']['processor']}, {result['machine']['cpu_count']} cores, "
        f"backend {result['machine']['backend']}, jax {result['machine']['jax']}; "
        f"measured float32 matmul peak {peak:.1f} GFLOP/s (best of sizes "
        + ", ".join(f"{n}: {g:.0f}" for n, g in result.get("matmul_peak_by_size", {}).items())
        + ")",
        "",
    ]
    header = f"{'row':<5}{'contender':<22}{'median':>12}{'speed-up':>10}{'temp MB':>10}{'peak MB':>10}  notes"
    lines += [header, "-" * len(header)]
    for row in result["rows"]:
        lines.append(f"{row['name']:<6}{row['description']}")
        for name in row["seconds"]:
            time_text, note = contender_figures(row, name, peak)
            memory = row.get("memory", {}).get(name, NOT_AVAILABLE)
            temp, peak_bytes = (_megabytes(memory[key]) for key in ("temp_bytes", "peak_bytes"))
            lines.append(
                f"{'':<5}{name:<22}{time_text:>12}{row['ratios'][name]:>9.2f}x{temp:>10}{peak_bytes:>10}  {note}".rstrip()
            )
    return "\n".join(lines)


def _megabytes(value: int | str) -> str:
    return f"{value / 1e6:.2f}" if isinstance(value, int) else str(value)
