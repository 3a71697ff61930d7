"""compare_gradients, its layer-by-layer localisation, finite differences, cost, and `mnet check` end to end."""

import json
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnet
from mnet.checking.agreement import FINITE_DIFFERENCE_TOLERANCE, tolerance
from mnet.checking.cost import compare_cost
from tests.helpers import run_mnet


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


def test_flop_counts_are_given_only_where_xla_counts_them_right():
    """A product counts ``2 m k n``; a loop's body (counted once whatever its trip count), a conditional's branches
    (all summed) and a solver (counted as nothing) make the count "n/a", and a loop without products (a random draw)
    leaves it as it is."""
    from mnet.compiled import compiled_flops

    a = jnp.ones((16, 24), jnp.float32)
    b = jnp.ones((24, 8), jnp.float32)

    def count(fn, *args):
        return compiled_flops(jax.jit(fn).lower(*args).compile())

    assert count(lambda x: x @ b, a) == 2 * 16 * 24 * 8
    square = jnp.eye(8)
    assert count(lambda x: jax.lax.scan(lambda c, _: (c @ square, None), x, None, length=3)[0], square) == "n/a"
    assert count(lambda p, x: jax.lax.cond(p, lambda: x @ b, lambda: x[:, :8]), True, a) == "n/a"
    assert count(jnp.linalg.cholesky, square + 2 * jnp.eye(8)) == "n/a"
    drawn = count(lambda x, key: x @ b + jax.random.gamma(key, 2.0, (16, 8)), a, jax.random.key(0))
    assert isinstance(drawn, float) and drawn >= 2 * 16 * 24 * 8

    class Missing:
        def cost_analysis(self):
            raise NotImplementedError

    assert compiled_flops(Missing()) == "n/a"


def run_cli(*args):
    return run_mnet(*args)


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


def test_mixed_precision_is_judged_by_the_precision_it_computes_in():
    """Defect 1: float32 gradients from bfloat16 products carry bfloat16's rounding, so float32's tolerance failed
    them; the working precision is read from the compiled function's jaxpr."""
    from mnet.checking.agreement import working_precision

    net = mnet.mlp([32, 10], compute_dtype="bfloat16")
    _, params = net.init(jax.random.key(0), (64,))
    x, y = jax.random.normal(jax.random.key(1), (16, 64)), jnp.arange(16) % 10
    report = mnet.compare_gradients(net, mnet.losses.softmax_cross_entropy, params, x, y)
    assert report.ok and {row.autodiff.tolerance for row in report.rows} == {tolerance(jnp.bfloat16)}
    worst = max(row.autodiff.max_rel_error for row in report.rows)
    assert tolerance(jnp.float32) < worst < tolerance(jnp.bfloat16)  # above float32's: the old verdict
    x32 = x.astype(jnp.float32)
    assert working_precision(lambda a: (a.astype(jnp.float16) * 2).astype(jnp.float32), x32) == jnp.float16
    assert working_precision(lambda a: a * 2, x32) == jnp.float32
    assert working_precision(lambda a: a + 1, jnp.arange(3)) is None


@dataclass(frozen=True)
class WrongShapeScale:
    """A user's layer whose backward sums its gradient over the features too: a scalar for a (d,) parameter."""

    def init(self, key, input_shape):
        return tuple(input_shape), {"s": jnp.ones(input_shape[-1])}

    def forward(self, params, x):
        return x * params["s"], x

    def backward(self, params, x, dy):
        return {"s": jnp.sum(x * dy)}, dy * params["s"]


def test_a_backward_of_the_wrong_shape_is_named_at_its_position():
    """Defect 4: the wrong shape passed through value_and_grad, crashed compare_gradients in numpy and fit inside
    optax; now every entry point names the layer, its position and both shapes, while tracing."""
    net = mnet.serial(mnet.Dense(4), mnet.serial(mnet.Tanh(), WrongShapeScale()), mnet.Dense(3))
    _, params = net.init(jax.random.key(0), (5,))
    x, y = jnp.ones((6, 5)), jnp.arange(6) % 3
    loss = mnet.losses.softmax_cross_entropy
    expected = r"WrongShapeScale\(\) at position \[1\]\[1\] of the network: backward returned a gradient of shape \(\) "
    expected += r"for params\['s'\] of shape \(4,\)"
    with pytest.raises(mnet.LayerError, match=expected):
        jax.make_jaxpr(mnet.value_and_grad(net, loss))(params, x, y)
    with pytest.raises(mnet.LayerError, match=expected):
        mnet.compare_gradients(net, loss, params, x, y)
    digits = mnet.data.load_digits(0)
    wide = mnet.serial(mnet.Dense(4), WrongShapeScale(), mnet.Dense(10))
    _, wide_params = wide.init(jax.random.key(0), (64,))
    with pytest.raises(mnet.LayerError, match=r"WrongShapeScale\(\) at position \[1\]"):
        mnet.fit(wide, loss, wide_params, digits, epochs=1)
    with pytest.raises(mnet.LayerError, match="WrongShapeScale.*shape \\(\\) for params\\['s'\\]"):
        mnet.value_and_grad(WrongShapeScale(), mnet.losses.mse)({"s": jnp.ones(5)}, x, x)


def test_compare_gradients_checks_dropout_in_training_and_batchnorm_in_evaluation_mode():
    loss = mnet.losses.softmax_cross_entropy
    x, y = jax.random.normal(jax.random.key(1), (6, 5)), jnp.arange(6) % 3
    dropout = mnet.serial(mnet.Dense(8), mnet.Relu(), mnet.Dropout(0.4), mnet.Dense(3))
    _, params = dropout.init(jax.random.key(0), (5,))
    report = mnet.compare_gradients(
        dropout, loss, params, x, y, key=jax.random.key(3), train=True, finite_differences=True
    )
    assert report.ok and all(row.finite_differences.ok for row in report.rows)
    assert "layer-by-layer rows left out" in report.notes[-1]
    # the mask really is drawn: the gradient differs from evaluation mode's
    evaluation = mnet.compare_gradients(dropout, loss, params, x, y)
    assert not np.isclose(report.value, evaluation.value)
    batchnorm = mnet.serial(mnet.Dense(8), mnet.BatchNorm(), mnet.Tanh(), mnet.Dense(3))
    _, params = batchnorm.init(jax.random.key(0), (5,))
    state = jax.tree_util.tree_map(lambda s: s + 0.3, mnet.init_state(batchnorm, params, (5,)))
    for mode in (dict(state=state), dict(state=state, train=True)):
        report = mnet.compare_gradients(batchnorm, loss, params, x, y, finite_differences=True, **mode)
        assert report.ok and all(row.finite_differences.ok for row in report.rows), report
