"""The documentation works as written: every Python block of the README and of the site's pages runs, and the site
builds strictly (every link, every API page generated from the docstrings)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCKS = [
    (page.relative_to(ROOT), index, code)
    for page in PAGES
    for index, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]


def test_the_docs_have_examples():
    assert len(BLOCKS) >= 10
    assert any(str(page) == "README.md" for page, _, _ in BLOCKS)


@pytest.mark.parametrize("page, index, code", BLOCKS, ids=[f"{page}[{index}]" for page, index, _ in BLOCKS])
def test_docs_example_runs(page, index, code, capsys):
    exec(compile(code, f"{page}[python block {index}]", "exec"), {})


def test_readme_is_a_landing_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    assert (ROOT / "LICENSE").read_text().startswith("\n                                 Apache License")


def test_the_site_builds_strictly(tmp_path):
    beside = Path(sys.executable).with_name("mkdocs")
    tool = str(beside) if beside.exists() else shutil.which("mkdocs")
    if tool is None:
        pytest.fail("mkdocs is not installed: pip install -e '.[docs]' installs it (mkdocs-material, mkdocstrings)")
    result = subprocess.run(
        [tool, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "api" / "quantities" / "index.html").exists()
    page = (tmp_path / "site" / "api" / "quantities" / "index.html").read_text()
    assert "per_example_grad_norms" in page and "diag_hessian" in page
