"""Profile one training step, hand-derived vs jax.grad, operation by operation, from XLA's own execution trace.

    python experiments/profile_step.py [--row W1|C1|T1] [--calls 20] [--top 12]

Both steps (the same ones `mnet bench` times) are compiled and warmed up, then called alternately inside
`jax.profiler.trace(..., create_perfetto_trace=True)`. On CPU the trace holds one event per executed thunk (a
fusion, a `dot`, a custom call) with its thread. Per contender this prints every call's wall time (first thunk's
start to last thunk's end), the share of its operation time spent on the PJRT client thread (the caller, where
XLA's thunk executor runs work inline) rather than on the Eigen workers, and the median time of each operation. This is how the W1 float32 gap in BENCHMARKS.md was found.

The trace's event format belongs to JAX's profiler, not to mnet, and may change between JAX versions.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import jax

from mnet import bench

PROBLEMS = {
    "W1": lambda: bench.mlp_problem([784, 1024, 1024, 10], 256),
    "C1": lambda: bench.cnn_problem(128),
    "T1": lambda: bench.transformer_problem(128, 9),
}
EXECUTION = "CommonPjRtLoadedExecutable::ExecuteHelperOnSingleDevice"
THUNKS = "ThunkExecutor::Execute"


def trace_events(contenders: dict, calls: int) -> tuple[list[dict], dict[int, str]]:
    """Complete ("X") events of ``calls`` alternating rounds of the contenders, sorted by start time, and the
    names of the threads."""
    for fn in contenders.values():
        for _ in range(3):
            jax.block_until_ready(fn())
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for _ in range(calls):
                for fn in contenders.values():
                    jax.block_until_ready(fn())
        trace = next(Path(directory).rglob("perfetto_trace.json.gz"))
        events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    return sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"]), names


def per_call(events: list[dict], labels: list[str]) -> dict[str, list[list[dict]]]:
    """Each contender's calls, each call the thunk events between its execution start and the next one's."""
    starts = [e["ts"] for e in events if e["name"] == EXECUTION]
    calls: dict[str, list[list[dict]]] = defaultdict(list)
    cursor = 0
    for index, start in enumerate(starts):
        end = starts[index + 1] if index + 1 < len(starts) else float("inf")
        while cursor < len(events) and events[cursor]["ts"] < start:
            cursor += 1
        inside = []
        while cursor < len(events) and events[cursor]["ts"] < end:
            inside.append(events[cursor])
            cursor += 1
        calls[labels[index % len(labels)]].append([e for e in inside if e["name"] == THUNKS or is_operation(e)])
    return calls


def is_operation(event: dict) -> bool:
    """An executed HLO operation: XLA names them in lower case (``ynn_fusion.2``, ``dot.1``); its end markers
    (``end: ...``) and the runtime's own events are left out."""
    name = event["name"]
    return name[:1].islower() and not name.startswith("end:")


def report(calls: list[list[dict]], client_thread: int | None, top: int) -> str:
    walls, busy_times, client_shares, counts, durations = [], [], [], [], defaultdict(list)
    for events in calls:
        thunks = [e for e in events if e["name"] == THUNKS]
        operations = [e for e in events if is_operation(e)]
        if not thunks or not operations:
            continue
        walls.append((max(e["ts"] + e["dur"] for e in thunks) - min(e["ts"] for e in thunks)) / 1e3)
        busy = sum(e["dur"] for e in operations)
        busy_times.append(busy / 1e3)
        counts.append(len(operations))
        client_shares.append(sum(e["dur"] for e in operations if e["tid"] == client_thread) / busy)
        for e in operations:
            durations[e["name"]].append(e["dur"] / 1e3)
    lines = [f"  calls: {len(walls)}, wall median {statistics.median(walls):.3f} ms, min {min(walls):.3f}, "
             f"max {max(walls):.3f}; {statistics.median(counts):.0f} operations, their time summed over threads "
             f"{statistics.median(busy_times):.3f} ms",
             "  walls (ms):                " + " ".join(f"{w:5.1f}" for w in walls),
             "  on the client thread (%):  " + " ".join(f"{100 * c:5.0f}" for c in client_shares)]
    ranked = sorted(((statistics.median(d), name) for name, d in durations.items()), reverse=True)
    lines += [f"  {median:9.3f} ms  {name}" for median, name in ranked[:top]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", choices=sorted(PROBLEMS), default="W1")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--top", type=int, default=12, help="operations listed per contender")
    args = parser.parse_args()
    contenders = bench.step_contenders(*PROBLEMS[args.row]())
    events, threads = trace_events(contenders, args.calls)
    client_thread = next((tid for tid, name in threads.items() if "PjRtCpuClient" in name), None)
    print(f"{args.row} on {jax.devices()[0].device_kind}, {args.calls} alternating calls per contender")
    for label, calls in per_call(events, list(contenders)).items():
        print(f"{label}:\n{report(calls, client_thread, args.top)}")


if __name__ == "__main__":
    main()
