"""Several processes training one model: joining them (``jax.distributed``) and starting them on one machine.

Each process runs the same program. :func:`initialize` connects it to the others before any JAX computation;
``jax.devices()`` then lists every process's devices, a mesh over them spans the processes, and a jitted step whose
inputs are laid out on that mesh runs as one program with XLA's collectives between the processes. On CPU those
collectives need an implementation (``jax_cpu_collectives_implementation``: gloo, which ships with jaxlib), set
here; GPUs use NCCL by themselves.

Where the settings come from, first found wins: the arguments; ``MNET_COORDINATOR``, ``MNET_NUM_PROCESSES``,
``MNET_PROCESS_ID`` (what :func:`launch` sets); JAX's own ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``. With none of them the process trains alone.

Failure. JAX's coordination service watches every process's heartbeat: when one dies, the others are stopped
within ``heartbeat_seconds`` (their collectives would otherwise wait for it forever). :func:`launch` supervises
its processes the same way from outside: the first to fail is reported in one line, and any left after
``grace_seconds`` are killed, so a run never hangs and never leaves a process behind. What a run saved survives
(checkpoints are written whole or not at all), so a restarted run resumes from the last good epoch.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: mnet's subcommands: ``launch -- train ...`` runs ``python -m mnet train ...`` in each process.
SUBCOMMANDS = ("train", "check", "bench")


@dataclass(frozen=True)
class ProcessGroup:
    """Where this process stands: ``coordinator`` (``host:port`` of process 0), ``count`` and ``index``."""

    coordinator: str
    count: int
    index: int


def settings(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> ProcessGroup | None:
    """The process group from the arguments or the environment (see the module's docstring), or None when this
    process runs alone.

    Raises:
        ValueError: a partial or inconsistent setting (a count without a coordinator, an index out of range).
    """

    def pick(value, *names):
        if value is not None:
            return value
        return next((os.environ[name] for name in names if os.environ.get(name)), None)

    coordinator = pick(coordinator, "MNET_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
    count = pick(num_processes, "MNET_NUM_PROCESSES", "JAX_NUM_PROCESSES")
    index = pick(process_id, "MNET_PROCESS_ID", "JAX_PROCESS_ID")
    if coordinator is None and count is None and index is None:
        return None
    if coordinator is None or count is None or index is None:
        raise ValueError(
            "several processes need all three of the coordinator address, the process count and this process's "
            f"index (got coordinator={coordinator}, count={count}, index={index}); set MNET_COORDINATOR, "
            "MNET_NUM_PROCESSES and MNET_PROCESS_ID, or use mnet launch"
        )
    try:
        count, index = int(count), int(index)
    except ValueError:
        raise ValueError(f"the process count and index must be integers, got {count!r} and {index!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process index {index} is not in [0, {count}) processes")
    return ProcessGroup(str(coordinator), count, index)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_seconds: int = 10,
    timeout_seconds: int = 120,
) -> ProcessGroup | None:
    """Join this process to the others (``jax.distributed.initialize``), before any JAX computation.

    Arguments:
        coordinator: ``host:port`` of process 0 (it serves the coordination there).
        num_processes, process_id: how many processes, and which one this is.
        heartbeat_seconds: a process silent this long is declared dead, and the others are stopped.
        timeout_seconds: how long to wait for every process to join.

    Returns:
        The :class:`ProcessGroup`, or None (nothing done) when no setting is found: a single process.
    """
    group = settings(coordinator, num_processes, process_id)
    if group is None or group.count == 1:
        return group
    import jax

    # CPU collectives across processes go through gloo; the setting does nothing on GPUs (NCCL) and TPUs.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        group.coordinator,
        group.count,
        group.index,
        initialization_timeout=timeout_seconds,
        heartbeat_timeout_seconds=heartbeat_seconds,
    )
    return group


def is_leader() -> bool:
    """Whether this process speaks for the group (process 0): it prints and writes the files."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier called ``name`` (nothing to wait for alone)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def free_port() -> int:
    """A TCP port that is free on this machine now, for the coordinator."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def command_line(argv: Sequence[str]) -> list[str]:
    """What each process runs: ``python -m mnet ARGV`` for an mnet subcommand, ``ARGV`` itself otherwise."""
    argv = list(argv)
    if not argv:
        raise ValueError("launch: nothing to run; give a command after --, e.g. mnet launch -n 2 -- train")
    return [sys.executable, "-m", "mnet", *argv] if argv[0] in SUBCOMMANDS else argv


def start(
    count: int, argv: Sequence[str], *, local_devices: int | None = None, port: int | None = None, **popen
) -> list[subprocess.Popen]:
    """Start ``count`` processes of ``argv`` (see :func:`command_line`) on this machine, joined through a
    coordinator on ``127.0.0.1``. ``local_devices`` gives each process that many CPU devices (forced host devices,
    and the CPU platform), standing in for the accelerators of several hosts."""
    if count < 1:
        raise ValueError(f"launch: the process count must be at least 1, got {count}")
    command = command_line(argv)
    coordinator = f"127.0.0.1:{port or free_port()}"
    processes = []
    for index in range(count):
        env = dict(os.environ, MNET_COORDINATOR=coordinator, MNET_NUM_PROCESSES=str(count))
        env["MNET_PROCESS_ID"] = str(index)
        if local_devices is not None:
            flags = env.get("XLA_FLAGS", "")
            env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={local_devices}".strip()
            env["JAX_PLATFORMS"] = "cpu"
        processes.append(subprocess.Popen(command, env=env, **popen))
    return processes


def stop(processes: Sequence[subprocess.Popen]) -> None:
    """Kill whichever of ``processes`` still run, and reap them all: nothing is left behind."""
    for process in processes:
        if process.poll() is None:
            process.kill()
    for process in processes:
        process.wait()


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def supervise(
    processes: Sequence[subprocess.Popen],
    *,
    grace_seconds: float = 30,
    timeout_seconds: float | None = None,
    say: Callable[[str], None] | None = None,
) -> int:
    """Wait for every process. When one fails, report it, give the others ``grace_seconds`` to stop by themselves
    (JAX stops them once the heartbeat is missed), then kill the rest. After ``timeout_seconds`` (if given), kill
    them all.

    Returns:
        0 when all succeed, else the first failure's status (128 + the signal for a killed process; 124 for the
        timeout).
    """
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    failed: tuple[int, int] | None = None
    deadline = None
    began = time.monotonic()
    while True:
        if timeout_seconds is not None and time.monotonic() - began > timeout_seconds:
            stop(processes)
            say(f"mnet launch: the {len(processes)} processes ran past {timeout_seconds:g} s; stopped them all")
            return 124
        codes = [process.poll() for process in processes]
        if failed is None:
            bad = [(index, code) for index, code in enumerate(codes) if code not in (None, 0)]
            if bad:
                failed = bad[0]
                deadline = time.monotonic() + grace_seconds
                say(
                    f"mnet launch: process {failed[0]} of {len(processes)} {_describe(failed[1])}; stopping the "
                    "others (a run with a checkpoint resumes from its last good epoch with --resume)"
                )
        if all(code is not None for code in codes):
            break
        if deadline is not None and time.monotonic() > deadline:
            stop(processes)
            break
        time.sleep(0.05)
    if failed is None:
        return 0
    code = failed[1]
    return 128 - code if code < 0 else code


def launch(
    count: int,
    argv: Sequence[str],
    *,
    local_devices: int | None = None,
    grace_seconds: float = 30,
    port: int | None = None,
) -> int:
    """Run ``argv`` as ``count`` processes joined into one group on this machine (:func:`start`), and wait for them
    (:func:`supervise`). Interrupting the launcher stops them all.

    Returns:
        0 when every process succeeds, else the first failure's exit status.
    """
    processes = start(count, argv, local_devices=local_devices, port=port)
    try:
        return supervise(processes, grace_seconds=grace_seconds)
    except KeyboardInterrupt:
        stop(processes)
        raise
