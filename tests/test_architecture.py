"""The house rules, enforced: the layering of docs/ARCHITECTURE.md (import-linter), no private name crossing a
module, imports inside functions only for optional or deferred dependencies (each commented), and the public
names of API.md importable from ``mnet`` as before."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mnet

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mnet"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    beside = Path(sys.executable).with_name("lint-imports")
    tool = str(beside) if beside.exists() else shutil.which("lint-imports")
    if tool is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[test]' installs it (import-linter)")
    return subprocess.run(
        [tool, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(root)}
    )


def test_import_contracts_are_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    "module, planted",
    [
        ("core/sums.py", "import mnet.quantities.gradient  # planted: the core reaching up to a quantity"),
        ("layers/dense.py", "from mnet.checking import reference  # planted: a layer importing the referee"),
        ("quantities/ntk.py", "import mnet.quantities.per_example as _  # fine\nimport mnet.training.fit  # planted"),
    ],
)
def test_a_planted_upward_import_breaks_the_contract(tmp_path, module, planted):
    shutil.copytree(PACKAGE, tmp_path / "mnet", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "mnet" / module
    target.write_text(target.read_text() + "\n" + planted + "\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "mnet's rooms import only downwards" in result.stdout


def modules(*roots: Path):
    for root in roots:
        yield from sorted(root.rglob("*.py"))


def test_no_private_name_crosses_a_module():
    crossings = []
    for path in modules(PACKAGE, ROOT / "tests", ROOT / "experiments"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mnet"):
                crossings += [
                    f"{path.relative_to(ROOT)}:{node.lineno} {a.name}" for a in node.names if a.name[0] == "_"
                ]
    assert not crossings, "private names imported from another module:\n" + "\n".join(crossings)


#: The only imports inside functions: dependencies that are optional (peers, plotting backends) or deferred for a
#: stated reason. Each is commented on its line or the line above.
DEFERRED = {
    "torch",
    "equinox",
    "flax",
    "orbax.checkpoint",
    "kfac_jax",
    "matplotlib",
    "matplotlib.pyplot",
    "sklearn.datasets",
    "jax.experimental",
    "dp_accounting",
    # the PyTorch peers of mnet bench --peers
    "backpack",
    "curvlinops",
    "opacus",
    "opacus.grad_sample",
    "opacus.optimizers",
    "opacus.utils.fast_gradient_clipping_utils",
    "torch.func",
}


def test_imports_inside_functions_are_optional_and_commented():
    found = []
    for path in modules(PACKAGE):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset > 0:
                name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                commented = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                if name not in DEFERRED or not commented:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name} (commented: {commented})")
    assert not found, "imports inside functions that are not optional and commented:\n" + "\n".join(found)


#: The public names of ../shared/API.md (layers, losses, gradients, quantities, curvature, checks, saving). The
#: modern-transformer names of its "More layers" table (RMSNorm, Silu, GatedMLP, models.gpt) are that issue's.
API = """
Dense Relu Sigmoid Tanh LeakyRelu Elu Gelu Softplus Identity Softmax Flatten serial residual parallel Reshape
Conv2D MaxPool2D AvgPool2D MultiHeadSelfAttention BatchNorm RNN LSTM GRU LastStep Embedding LayerNorm Dropout Layer
LayerProtocol value_and_grad grad autodiff_value_and_grad compare_gradients per_example_grads per_example_grad_norms
jacobian ntk with_manual_backward check_layer jvp ggn_vector_product hessian_vector_product diag_ggn
per_example_diag_ggn diag_hessian kfac_factors kfac laplace save_params load_params fit
""".split()


@pytest.mark.parametrize("name", API)
def test_public_names_of_the_api_import_from_mnet(name):
    assert name in mnet.__all__ and callable(getattr(mnet, name))


def test_losses_and_models_of_the_api():
    for name in ("mse", "softmax_cross_entropy", "sigmoid_binary_cross_entropy"):
        loss = getattr(mnet.losses, name)
        assert all(callable(getattr(loss, method)) for method in ("value", "per_example", "grad"))
    assert callable(mnet.models.mlp)
    assert sorted(mnet.__all__) == sorted(set(mnet.__all__)), "mnet.__all__ lists a name twice"
    assert all(hasattr(mnet, name) for name in mnet.__all__)


def test_the_rule_table_in_the_docs_is_the_one_the_code_generates():
    from mnet.checking.rules import rule_table

    assert (ROOT / "docs" / "rules.md").read_text() == rule_table(), (
        "docs/rules.md is stale: python -m mnet.checking.rules > docs/rules.md"
    )


def test_the_rule_table_changes_when_a_layer_gains_a_rule(monkeypatch):
    from mnet.checking import rules

    before = rules.rule_table()
    monkeypatch.setattr(mnet.BatchNorm, "diag_hessian", lambda self, params, cache, curvature: None, raising=False)
    after = rules.rule_table()
    assert before != after
    row = next(line for line in after.splitlines() if line.startswith("| `BatchNorm`"))
    assert row.split(" | ")[rules.RULES.index("diag_hessian") + 1] == "own"


def test_importing_mnet_computes_nothing():
    """No module computes with JAX at import: the backend must still be free for ``jax.distributed.initialize``
    (several processes), which ``mnet train`` calls after importing every subcommand."""
    code = (
        "import importlib, pkgutil, mnet\n"
        "for m in pkgutil.walk_packages(mnet.__path__, 'mnet.'):\n"
        "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge.backends_are_initialized(), 'an import started the XLA backend'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_every_slow_listed_test_exists_and_every_test_file_keeps_a_fast_test():
    listed = [
        line.strip()
        for line in (ROOT / "tests" / "slow.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for entry in listed:
        path, function = entry.split("::")
        assert f"def {function}(" in (ROOT / path).read_text(), f"tests/slow.txt lists {entry}, which does not exist"
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        functions = [n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)]
        tests = [f for f in functions if f.startswith("test_")]
        fast = [f for f in tests if f"tests/{path.name}::{f}" not in listed]
        assert fast, f"{path.name} has no test in the fast subset (tests/slow.txt lists them all)"
