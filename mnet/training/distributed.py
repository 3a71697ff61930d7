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
from dataclasses import dataclass

import jax
from jax.experimental import multihost_utils

from mnet.errors import SettingError


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
        raise SettingError(
            "several processes need all three of the coordinator address, the process count and this process's "
            f"index (got coordinator={coordinator}, count={count}, index={index}); set MNET_COORDINATOR, "
            "MNET_NUM_PROCESSES and MNET_PROCESS_ID, or use mnet launch"
        )
    try:
        count, index = int(count), int(index)
    except ValueError:
        raise SettingError(f"the process count and index must be integers, got {count!r} and {index!r}") from None
    if count < 1 or not 0 <= index < count:
        raise SettingError(f"process index {index} is not in [0, {count}) processes")
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

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier called ``name`` (nothing to wait for alone)."""

    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
