"""The house stays clean: ruff (lint and format) and mypy on mnet/, as the README says to run them."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tool(name):
    """The tool installed beside this Python (the test extra installs it), else on the PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' installs it")
    return found


@pytest.mark.parametrize(
    "command",
    [["ruff", "check", "mnet"], ["ruff", "format", "--check", "mnet"], ["mypy", "mnet"]],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_mnet_is_clean(command):
    result = subprocess.run([tool(command[0]), *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
