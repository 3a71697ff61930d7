"""``compare_cost``: the compiled hand-derived and autodiff gradient functions side by side, by XLA's cost and memory
analysis and by measured time, in one process.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from typing import Any

import jax

from mnet.checking.reference import autodiff_value_and_grad
from mnet.compiled import compiled_flops, compiled_memory, cost_analysis, median_seconds
from mnet.core.protocol import Array, LayerProtocol, Params
from mnet.losses import Loss
from mnet.quantities.gradient import value_and_grad

Layer = LayerProtocol


def compare_cost(net: Layer, loss: Loss, params: Params, x: Array, targets: Array, *, repeats: int = 50) -> dict:
    """The compiled hand-derived and autodiff gradient functions side by side in this process.

    Returns a dict with, for ``"hand"`` and ``"autodiff"``: XLA's cost analysis (``flops``, NaN where its count
    would be wrong, as for a scan's products: :func:`mnet.compiled.compiled_flops`; ``bytes_accessed``), its
    memory analysis (``temp_bytes``, ``peak_bytes``: see :func:`compiled_memory`),
    ``compile_seconds``, and ``seconds`` (median of ``repeats`` timed calls after a warm-up, the two contenders
    interleaved so that machine noise hits both alike); ``time_ratio`` (hand / autodiff; below 1 means the
    hand-derived path is faster) and ``memory_ratio`` (hand / autodiff temporary bytes, or ``"n/a"``).
    """
    contenders = {"hand": value_and_grad(net, loss), "autodiff": autodiff_value_and_grad(net, loss)}
    result: dict[str, Any] = {}
    compiled = {}
    for name, fn in contenders.items():
        start = time.perf_counter()
        compiled[name] = jax.jit(fn).lower(params, x, targets).compile()
        compile_seconds = time.perf_counter() - start
        flops = compiled_flops(compiled[name])
        result[name] = {
            "flops": flops if isinstance(flops, float) else math.nan,
            "bytes_accessed": float(cost_analysis(compiled[name]).get("bytes accessed", math.nan)),
            "compile_seconds": compile_seconds,
            **compiled_memory(compiled[name]),
        }
        jax.block_until_ready(compiled[name](params, x, targets))
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(max(repeats // 5, 1)):
        for name in contenders:
            samples[name].append(median_seconds(functools.partial(compiled[name], params, x, targets), 5))
    for name in contenders:
        result[name]["seconds"] = statistics.median(samples[name])
    result["time_ratio"] = result["hand"]["seconds"] / result["autodiff"]["seconds"]
    hand_temp, autodiff_temp = result["hand"]["temp_bytes"], result["autodiff"]["temp_bytes"]
    numeric = isinstance(hand_temp, int) and isinstance(autodiff_temp, int) and autodiff_temp > 0
    result["memory_ratio"] = hand_temp / autodiff_temp if numeric else "n/a"
    return result
