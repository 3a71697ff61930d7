"""`mnet check` and `mnet train` for any network: the built-in models and a user's MODULE:ATTR, and every bad value
as one line and exit status 2, each run in-process through the command line's own entry point (`mnet.cli.main`)."""

import json
import textwrap

import numpy as np
import pytest

from tests.helpers import run_mnet

USER_MODULE = textwrap.dedent('''
    from dataclasses import dataclass

    import jax
    import jax.numpy as jnp

    import mnet


    @dataclass(frozen=True)
    class Scale:
        """A duck-typed layer with params and only a backward rule."""

        def init(self, key, input_shape):
            return tuple(input_shape), {"s": jnp.ones(input_shape[-1])}

        def forward(self, params, x):
            return x * params["s"], x

        def backward(self, params, x, dy):
            return {"s": jnp.sum(x * dy, axis=0)}, dy * params["s"]


    net = mnet.serial(mnet.Reshape((8, 8, 1)), mnet.Conv2D(4, 3), mnet.Relu(), mnet.Flatten(), Scale(), mnet.Dense(10))
    image_net = mnet.serial(mnet.Conv2D(3, 3), mnet.Tanh(), mnet.Flatten(), mnet.Dense(5))
    not_a_layer = 42

    def make():
        return mnet.serial(mnet.Dense(16), mnet.Relu(), mnet.Dense(10))

    def wrong_width():
        return mnet.serial(mnet.Dense(7))
''')


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    (folder / "user_nets.py").write_text(USER_MODULE)
    (folder / "broken_nets.py").write_text("import no_such_package_anywhere\n")
    return folder


def run_cli(*args, cwd=None):
    return run_mnet(*args, cwd=cwd)


def test_check_a_users_network_and_the_built_in_models(workdir):
    result = run_cli(
        "check", "--net", "user_nets:image_net", "--input-shape", "6,6,2", "--dtype", "float64", "--json", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["ok"] and "Conv2D(3" in report["network"] and len(report["leaves"]) == 4
    for model in ("cnn", "transformer"):
        result = run_cli("check", "--model", model, "--batch", "4")
        assert result.returncode == 0, result.stderr
        assert "gradients agree" in result.stdout


def test_train_a_users_network_and_the_cnn(workdir):
    result = run_cli("train", "--model", "user_nets:net", "--epochs", "2", "--batch-size", "64", "--json", cwd=workdir)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["test_accuracy"] > 0.6 and summary["model"] == "user_nets:net"
    assert "Scale()" in result.stderr and "agree" in result.stderr
    result = run_cli("train", "--model", "cnn", "--epochs", "1", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["test_accuracy"] > 0.5


def test_train_the_transformer_on_the_sequence_task():
    result = run_cli(
        "train", "--model", "transformer", "--epochs", "1", "--batch-size", "128", "--lr", "3e-3", "--json"
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert "odd one out" in result.stderr and summary["train_loss"] < 2.77  # below log(16): it learns something


def test_train_a_gpt_reports_bits_per_character(tmp_path):
    from mnet.training import text

    train, valid, files = text.stdlib_corpus(5000)
    assert files >= 20 and train.dtype == np.int32 and train.max() < text.VOCAB
    assert text.decode(text.encode("def f(x):\n\treturn x")) == "def f(x):\n return x"  # a tab is one space
    dataset = text.load_stdlib_text(context=16, max_chars=5000)
    assert dataset.x_train.shape[1:] == (16,) and np.array_equal(dataset.x_train[0, 1:], dataset.y_train[0, :-1])
    np.savez(tmp_path / "chars.npz", x=dataset.x_train[:96], y=dataset.y_train[:96], x_test=dataset.x_test[:32],
             y_test=dataset.y_test[:32])  # fmt: skip
    result = run_cli("train", "--model", "gpt", "--data", str(tmp_path / "chars.npz"), "--epochs", "2", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["test_bits_per_character"] == pytest.approx(summary["test_loss"] / np.log(2))
    assert summary["train_bits_per_character"] < np.log2(97)  # it learns something
    assert "GatedMLP" in result.stderr and "agree" in result.stderr
    np.savez(tmp_path / "flat.npz", x=dataset.x_train[:64], y=dataset.y_train[:64, 0])
    result = run_cli("train", "--model", "gpt", "--data", str(tmp_path / "flat.npz"), "--epochs", "1")
    assert result.returncode == 2 and "next-token labels of shape (n, T)" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["check", "--net", "no_such_module:net", "--input-shape", "4"], "cannot import module 'no_such_module'"),
        (["check", "--net", "broken_nets:net", "--input-shape", "4"], "ModuleNotFoundError"),
        (["check", "--net", "user_nets:missing", "--input-shape", "4"], "has no attribute 'missing'"),
        (["check", "--net", "user_nets:not_a_layer", "--input-shape", "4"], "not a layer"),
        (["check", "--net", "user_nets", "--input-shape", "4"], "expected one of mlp, cnn, transformer or MODULE:ATTR"),
        (["check", "--net", "user_nets:image_net"], "give one example's shape with --input-shape"),
        (
            ["check", "--net", "user_nets:image_net", "--input-shape", "6,x"],
            "expected comma-separated positive integers",
        ),
        (
            ["check", "--net", "user_nets:image_net", "--input-shape", "2,2,1"],
            "kernel (3, 3) is larger than the padded",
        ),
        (["train", "--model", "user_nets:wrong_width", "--epochs", "1"], "its output must be (10,)"),
        (["train", "--model", "user_nets:not_a_layer", "--epochs", "1"], "not a layer"),
    ],
)
def test_bad_values_are_one_line_and_exit_2(workdir, args, message):
    result = run_cli(*args, cwd=workdir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"mnet {args[0]}: error:") and message in result.stderr, result.stderr
