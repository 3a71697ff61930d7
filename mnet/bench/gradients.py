"""Benchmark rows of the gradient and the derivatives beyond it: training steps (with PyTorch where installed),
compile time, per-example norms and gradients, the NTK and the Jacobian.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from mnet.bench.problems import (
    cnn_problem,
    hand_and_autodiff,
    mlp_problem,
    step_seconds,
    train_step,
    transformer_problem,
    vmapped_autodiff_grads,
    weights,
)
from mnet.bench.timing import Row, interleaved_medians
from mnet.compiled import compiled_memory
from mnet.core.sums import batch_sq_norms
from mnet.losses import softmax_cross_entropy
from mnet.quantities.jacobian import jacobian
from mnet.quantities.ntk import contract_jacobians, ntk
from mnet.quantities.per_example import per_example_grad_norms, per_example_grads


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
    flops = 6 * batch * weights(widths)
    precision = f"{compute_dtype} compute, float32 params" if compute_dtype else "float32"
    extra = {
        "gflops_per_s": {k: flops / s / 1e9 for k, s in seconds.items()},
        "flops_per_step": flops,
        "precision": precision,
        # Throughput is set against the matmul peak of the dtype the products run in (bfloat16 has its own).
        "peak_dtype": compute_dtype or "float32",
    }
    return Row(
        name, f"training step, MLP {'-'.join(map(str, widths))}, batch {batch}, {precision}", seconds, "jax.grad", extra
    )


def row_fused_training(widths: list[int], batch: int, steps: int, rounds: int) -> Row:
    """``steps`` SGD steps: fused in one ``lax.scan`` (hand and autodiff) vs a Python loop of jitted steps."""
    net, params, x, y = mlp_problem(widths, batch)
    pair = hand_and_autodiff(net)
    contenders: dict[str, Callable[[], object]] = {}
    for label, grad_fn in pair.items():
        optimizer, step = train_step(grad_fn)

        def run(params, state, step=step):
            def body(carry, _):
                p, s, _ = step(*carry, x, y)
                return (p, s), None

            (params, state), _ = jax.lax.scan(body, (params, state), None, length=steps)
            return params

        jitted = jax.jit(run)
        state = optimizer.init(params)
        contenders[f"{label} scan"] = functools.partial(jitted, params, state)
    optimizer, step = train_step(pair["hand"])
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
        import torch  # optional: the PyTorch contender, where installed
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
        for label, grad_fn in hand_and_autodiff(net).items():
            optimizer, step = train_step(grad_fn)
            jax.clear_caches()
            start = time.perf_counter()
            compiled = jax.jit(step).lower(params, optimizer.init(params), x, y).compile()
            samples[label].append(time.perf_counter() - start)
            memory[label] = compiled_memory(compiled)
    seconds = {k: statistics.median(v) for k, v in samples.items()}
    return Row("W3", f"compile the training step, MLP {'-'.join(map(str, widths))}", seconds, "jax.grad", memory=memory)


def row_per_example_norms(widths: list[int], batch: int, rounds: int) -> Row:
    net, params, x, y = mlp_problem(widths, batch)
    hand = jax.jit(per_example_grad_norms(net, softmax_cross_entropy))
    reference = vmapped_autodiff_grads(net)
    auto = jax.jit(lambda p, x, y: jnp.sqrt(batch_sq_norms(reference(p, x, y), batch, x.dtype)))
    seconds = interleaved_medians(
        {"hand": functools.partial(hand, params, x, y), "vmap(jax.grad)": functools.partial(auto, params, x, y)}, rounds
    )
    return Row(
        "D1", f"per-example gradient norms, MLP {'-'.join(map(str, widths))}, batch {batch}", seconds, "vmap(jax.grad)"
    )


def row_per_example_grads(widths: list[int], batch: int, rounds: int) -> Row:
    net, params, x, y = mlp_problem(widths, batch)
    hand = jax.jit(per_example_grads(net, softmax_cross_entropy))
    auto = jax.jit(vmapped_autodiff_grads(net))
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
    hand = jax.jit(ntk(net))
    contract = contract_jacobians
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
    hand = jax.jit(jacobian(net))
    rev = jax.jit(jax.jacrev(net.apply))
    contenders = {"hand": functools.partial(hand, params, x), "jax.jacrev": functools.partial(rev, params, x)}
    if forward_mode:
        fwd = jax.jit(jax.jacfwd(net.apply))
        contenders["jax.jacfwd"] = functools.partial(fwd, params, x)
    seconds = interleaved_medians(contenders, rounds)
    return Row(
        "D4", f"output-parameter Jacobian, MLP {'-'.join(map(str, widths))}, batch {batch}", seconds, "jax.jacrev"
    )
