"""Starting and watching several local processes (``mnet launch``): no JAX here, so that the launcher never holds a
device or a coordinator of its own.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from mnet.errors import SettingError

#: mnet's subcommands: ``launch -- train ...`` runs ``python -m mnet train ...`` in each process.
SUBCOMMANDS = ("train", "check", "eval", "predict", "bench")

#: Start-up lines of the collective libraries that every process prints and that say nothing to a user (gloo's
#: "Rank 0 is connected to 1 peer ranks"); :func:`launch` drops them from what it passes on.
NOISE = (re.compile(r"^\[Gloo\] Rank \d+ is connected to \d+ peer ranks"),)


def forward_lines(source, target) -> threading.Thread:
    """Copy ``source``'s lines to ``target`` as they come, leaving out :data:`NOISE`, on a thread of its own."""

    def copy() -> None:
        for line in iter(source.readline, ""):
            if not any(pattern.match(line) for pattern in NOISE):
                target.write(line)
                target.flush()
        source.close()

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return thread


def free_port() -> int:
    """A TCP port that is free on this machine now, for the coordinator."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def command_line(argv: Sequence[str]) -> list[str]:
    """What each process runs: ``python -m mnet ARGV`` for an mnet subcommand, ``ARGV`` itself otherwise."""
    argv = list(argv)
    if not argv:
        raise SettingError("launch: nothing to run; give a command after --, e.g. mnet launch -n 2 -- train")
    return [sys.executable, "-m", "mnet", *argv] if argv[0] in SUBCOMMANDS else argv


def start(
    count: int, argv: Sequence[str], *, local_devices: int | None = None, port: int | None = None, **popen
) -> list[subprocess.Popen]:
    """Start ``count`` processes of ``argv`` (see :func:`command_line`) on this machine, joined through a
    coordinator on ``127.0.0.1``. ``local_devices`` gives each process that many CPU devices (forced host devices,
    and the CPU platform), standing in for the accelerators of several hosts."""
    if count < 1:
        raise SettingError(f"launch: the process count must be at least 1, got {count}")
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
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    processes = start(count, argv, local_devices=local_devices, port=port, **pipes)
    copies = [forward_lines(p.stdout, sys.stdout) for p in processes] + [
        forward_lines(p.stderr, sys.stderr) for p in processes
    ]
    try:
        return supervise(processes, grace_seconds=grace_seconds)
    except KeyboardInterrupt:
        stop(processes)
        raise
    finally:
        for copy in copies:
            copy.join(timeout=5)
