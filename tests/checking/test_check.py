"""compare_gradients, its layer-by-layer localisation, finite differences, cost, and `mnet check` end to end."""

import json
import subprocess
import sys
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnet
from mnet.checking.agreement import FINITE_DIFFERENCE_TOLERANCE, tolerance
from mnet.checking.cost import compare_cost


@dataclass(frozen=True, repr=False)
class WrongBiasDense(mnet.Dense):
    """A user-written layer following the protocol, with a sign error in its bias gradient."""

    def __repr__(self):
        return f"WrongBiasDense({self.out_dim})"

    def backward(self, params, x, dz):
        grads, dx = super().backward(params, x, dz)
        return {"W": grads["W"], "b": -grads["b"]}, dx


def problem(net, dtype, loss=mnet.losses.softmax_cross_entropy, in_dim=6, batch=8, classes=4):
    _, params = net.init(jax.random.key(0), (in_dim,), dtype)
    params = jax.tree_util.tree_map(lambda p: p + 0.05, params)
    x = jax.random.normal(jax.random.key(1), (batch, in_dim), dtype)
    targets = jnp.arange(batch) % classes
    return net, loss, params, x, targets


HONEST = mnet.serial(mnet.Dense(16), mnet.Tanh(), mnet.Dense(12), mnet.Gelu(), mnet.Dense(4))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("finite_differences", [False, True])
def test_honest_network_agrees(dtype, finite_differences):
    report = mnet.compare_gradients(*problem(HONEST, dtype), finite_differences=finite_differences)
    assert report.ok, str(report)
    assert [row.path for row in report.rows] == ["[0]['W']", "[0]['b']", "[2]['W']", "[2]['b']", "[4]['W']", "[4]['b']"]
    assert report.rows[0].shape == (6, 16)
    for row in report.rows:
        assert row.autodiff.cosine > 1 - 1e-6
        assert row.autodiff.max_rel_error <= tolerance(dtype)
        if dtype == jnp.float64:
            assert row.autodiff.max_rel_error < 1e-12
        if finite_differences:
            assert row.finite_differences.max_rel_error <= max(FINITE_DIFFERENCE_TOLERANCE, tolerance(dtype))
            assert row.differenced.startswith("all") or "dirs" in row.differenced
    assert len(report.layers) == 5 and all(layer.ok for layer in report.layers)
    assert report.first_wrong_layer is None
    assert "gradients agree" in str(report)
    data = json.loads(report.to_json())
    assert data["ok"] is True and len(data["leaves"]) == 6 and data["first_wrong_layer"] is None


def test_large_leaves_are_sampled_for_finite_differences():
    net = mnet.serial(mnet.Dense(40), mnet.Sigmoid(), mnet.Dense(3))
    report = mnet.compare_gradients(*problem(net, jnp.float64, classes=3), finite_differences=True)
    assert report.ok
    assert report.rows[0].differenced == "24 of 240 + 4 dirs" and report.rows[1].differenced == "all 40"


@pytest.mark.parametrize("finite_differences", [False, True])
def test_wrong_layer_is_caught_and_named(finite_differences):
    net = mnet.serial(mnet.Dense(16), mnet.Tanh(), WrongBiasDense(12), mnet.Gelu(), mnet.Dense(4))
    report = mnet.compare_gradients(*problem(net, jnp.float64), finite_differences=finite_differences)
    assert not report.ok
    wrong = [row.path for row in report.rows if not row.ok]
    assert wrong == ["[2]['b']"], str(report)
    bias_row = report.rows[3]
    assert bias_row.autodiff.cosine == pytest.approx(-1.0)
    if finite_differences:
        assert not bias_row.finite_differences.ok and bias_row.autodiff_vs_finite_differences.ok
    assert report.first_wrong_layer.position == "[2]"
    assert report.first_wrong_layer.layer == "WrongBiasDense(12)"
    assert report.first_wrong_layer.wrong_parts == ["d['b']"]
    text = str(report)
    assert "[2]['b']" in text and "MISMATCH" in text and "first wrong layer is [2] WrongBiasDense(12)" in text
    assert json.loads(report.to_json())["first_wrong_layer"] == "[2]"


def test_wrong_input_gradient_is_pinned_to_its_layer_even_though_its_own_leaves_agree():
    """A layer with a wrong dx corrupts the leaves *before* it; only the layer check names the culprit."""

    @dataclass(frozen=True, repr=False)
    class WrongDx(mnet.Dense):
        def __repr__(self):
            return "WrongDx"

        def backward(self, params, x, dz):
            grads, dx = super().backward(params, x, dz)
            return grads, 2 * dx

    net = mnet.serial(mnet.Dense(5), mnet.Relu(), WrongDx(3))
    report = mnet.compare_gradients(*problem(net, jnp.float64, classes=3))
    assert [row.path for row in report.rows if not row.ok] == ["[0]['W']", "[0]['b']"]
    assert report.first_wrong_layer.position == "[2]" and report.first_wrong_layer.wrong_parts == ["dx"]


def test_nested_serial_positions():
    net = mnet.serial(mnet.Dense(5), mnet.serial(mnet.Elu(), WrongBiasDense(4)))
    report = mnet.compare_gradients(*problem(net, jnp.float64))
    assert report.first_wrong_layer.position == "[1][1]"
    assert [row.path for row in report.rows if not row.ok] == ["[1][1]['b']"]


def test_cost_comparison_reports_both_paths():
    cost = compare_cost(*problem(HONEST, jnp.float32), repeats=10)
    for name in ("hand", "autodiff"):
        assert cost[name]["flops"] > 0 and cost[name]["bytes_accessed"] > 0 and cost[name]["seconds"] > 0
    # Both compute the same products: their flop counts agree within a few percent.
    assert abs(cost["hand"]["flops"] / cost["autodiff"]["flops"] - 1) < 0.1
    assert cost["time_ratio"] > 0
    # XLA's memory analysis beside the time: present and positive on CPU (the peak counts the arguments too)
    for name in ("hand", "autodiff"):
        assert isinstance(cost[name]["temp_bytes"], int) and cost[name]["temp_bytes"] > 0
        assert cost[name]["peak_bytes"] > cost[name]["temp_bytes"]
    assert cost["memory_ratio"] == cost["hand"]["temp_bytes"] / cost["autodiff"]["temp_bytes"]


def test_memory_analysis_never_reports_a_zero():
    """A backend whose analysis is missing or all zeros is reported as "n/a"."""
    from types import SimpleNamespace

    from mnet.compiled import compiled_memory

    class Missing:
        def memory_analysis(self):
            raise NotImplementedError

    zeros = SimpleNamespace(
        temp_size_in_bytes=0, argument_size_in_bytes=0, output_size_in_bytes=0, alias_size_in_bytes=0
    )
    some = SimpleNamespace(
        temp_size_in_bytes=100, argument_size_in_bytes=40, output_size_in_bytes=8, alias_size_in_bytes=8
    )
    unknown = {"temp_bytes": "n/a", "peak_bytes": "n/a", "argument_bytes": "n/a"}
    assert compiled_memory(Missing()) == unknown
    assert compiled_memory(SimpleNamespace(memory_analysis=lambda: zeros)) == unknown
    assert compiled_memory(SimpleNamespace(memory_analysis=lambda: None))["temp_bytes"] == "n/a"
    assert compiled_memory(SimpleNamespace(memory_analysis=lambda: some)) == {
        "temp_bytes": 100,
        "peak_bytes": 140,
        "argument_bytes": 40,
    }


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mnet", *args], capture_output=True, text=True, timeout=300)


def test_cli_check_default_prints_table_and_exits_0():
    result = run_cli("check")
    assert result.returncode == 0, result.stderr
    assert "max rel err" in result.stdout and "[4]['W']" in result.stdout and "gradients agree" in result.stdout


def test_cli_check_json_with_everything():
    result = run_cli(
        "check",
        "--input-shape",
        "5",
        "--layers",
        "7",
        "--outputs",
        "3",
        "--activation",
        "tanh",
        "--loss",
        "mse",
        "--dtype",
        "float64",
        "--batch",
        "4",
        "--finite-differences",
        "--cost",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["ok"] is True and data["dtype"] == "float64" and len(data["leaves"]) == 4
    assert data["leaves"][0]["finite_differences"]["max_rel_error"] < 1e-6
    assert data["cost"]["hand"]["seconds"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers", "64,x"], "expected comma-separated positive integers"),
        (["--widths", "64"], "--widths needs the input width"),
        (["--model", "cnn", "--layers", "32"], "build --model mlp only"),
        (["--activation", "swish"], "invalid choice: 'swish'"),
        (["--batch", "0"], "expected a positive integer"),
        (["--dtype", "int8"], "invalid choice"),
        (["--loss", "cross_entropy", "--outputs", "1"], "at least 2 output classes"),
    ],
)
def test_cli_check_bad_options_one_line(args, message):
    result = run_cli("check", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("mnet check: error:") and message in result.stderr


def test_cli_check_exits_1_on_disagreement(monkeypatch, capsys):
    """The same entry point with a wrong rule swapped in: exit status 1 and the culprit named."""
    from mnet import cli, models

    real_mlp = models.mlp

    def wrong_mlp(widths, activation):
        net = real_mlp(widths, activation)
        return mnet.serial(*net.layers[:-1], WrongBiasDense(widths[-1]))

    monkeypatch.setattr(mnet, "mlp", wrong_mlp)
    assert cli.main(["check", "--input-shape", "6", "--layers", "8", "--outputs", "3", "--dtype", "float64"]) == 1
    out = capsys.readouterr().out
    assert "first wrong layer is [2] WrongBiasDense(3)" in out
    np.testing.assert_equal("MISMATCH" in out, True)
