#!/usr/bin/env python3
"""The README's two commands, needing only Python 3.11+ on the machine.

    python3 quickstart.py train    # set up .venv, then train on the bundled digits (hand-derived gradients,
                                   # verified against jax.grad first)
    python3 quickstart.py test     # set up .venv, then run the whole test suite (in parallel workers)
    python3 quickstart.py test --fast   # the developers' subset: every module, a few minutes
    python3 quickstart.py setup    # only set up .venv (to add packages to it by hand, torch for one)

Set-up is idempotent: the virtual environment in .venv is created once and the project installed into it
(editable, with the test and docs extras); later runs reuse it. Extra arguments are passed through
(``python3 quickstart.py train --epochs 5``, ``python3 quickstart.py test -k losses``). The tests run in one
worker process per core (pytest-xdist, each test file on one worker, so that its compiled programs are shared);
``-n 0`` runs them in this process.
"""

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".mnet-installed"


def set_up() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"mnet needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not PYTHON.exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pyproject = ROOT / "pyproject.toml"
    if not STAMP.exists() or STAMP.stat().st_mtime < pyproject.stat().st_mtime:
        print("installing mnet and its dependencies (first run only)", flush=True)
        pip = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        subprocess.run(pip + ["--upgrade", "pip"], check=True)
        subprocess.run(pip + ["-e", f"{ROOT}[test,docs]"], check=True)
        STAMP.touch()


def test_arguments(extra: list[str]) -> list[str]:
    """pytest's arguments: parallel workers unless ``-n`` is given; ``--fast`` leaves out the tests marked slow."""
    arguments = ["-m", "pytest", "-q"]
    if not any(a == "-n" or a.startswith("-n") and a[2:].isdigit() or a.startswith("--numprocesses") for a in extra):
        arguments += ["-n", "auto", "--dist", "loadfile"]
    if "--fast" in extra:
        extra = [a for a in extra if a != "--fast"]
        arguments += ["-m", "not slow"]
    return arguments + extra


def main(argv: list[str]) -> int:
    commands = {"train": lambda extra: ["-m", "mnet", "train", *extra], "test": test_arguments}
    if not argv or argv[0] not in (*commands, "setup"):
        print(f"usage: python3 quickstart.py {{{'|'.join((*commands, 'setup'))}}} [arguments...]", file=sys.stderr)
        return 2
    set_up()
    if argv[0] == "setup":
        return 0
    return subprocess.run([str(PYTHON), *commands[argv[0]](argv[1:])], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
