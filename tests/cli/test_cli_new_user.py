"""The command line as a new user meets it (issue 29): a regression test for each defect they found, the flags that
used to be ignored, and `mnet eval` / `mnet predict` from a checkpoint alone. In-process (`mnet.cli.main`), so that
each run costs its training alone."""

import json
import re

import numpy as np
import pytest
import safetensors
import safetensors.numpy

import mnet
from mnet import cli
from mnet.training import checkpoint, data


def run(capsys, *argv):
    """``(status, stdout, stderr)`` of one command."""
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def one_line_error(status, err, *fragments):
    assert status == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_training_passes_its_gradient_check(capsys, dtype):
    """Defect 1: the bf16/f16 products were judged by float32's tolerance, so training never started."""
    status, out, err = run(capsys, "train", "--compute-dtype", dtype, "--epochs", "2", "--layers", "64", "--json")
    assert status == 0, err
    assert "(tolerance 5.0e-02): agree" in err
    assert json.loads(out.splitlines()[-1])["test_accuracy"] > 0.8


def test_checkpoints_are_never_lost(capsys, tmp_path):
    """Defect 5 and the checkpoint messages: no silent overwrite, no silent fresh start, each difference in one line
    of the user's terms."""
    path = str(tmp_path / "run.npz")
    common = ("train", "--layers", "16", "--checkpoint", path)
    assert run(capsys, *common, "--epochs", "2")[0] == 0
    written = (tmp_path / "run.npz").read_bytes()
    one_line_error(*run(capsys, *common, "--epochs", "1")[::2], "already exists", "--resume", "--overwrite")
    assert (tmp_path / "run.npz").read_bytes() == written
    missing = str(tmp_path / "rnu.npz")
    one_line_error(*run(capsys, "train", "--checkpoint", missing, "--resume")[::2], "rnu.npz does not exist")
    one_line_error(*run(capsys, *common, "--resume", "--epochs", "1")[::2], "--epochs 1 is fewer than the 2 epochs")
    one_line_error(
        *run(capsys, *common, "--resume", "--epochs", "3", "--lr", "0.01")[::2],
        "cannot resume with other settings: lr 0.001 in the checkpoint, 0.01 now",
    )
    one_line_error(
        *run(capsys, *common, "--resume", "--epochs", "3", "--optimizer", "sgd")[::2],
        "optimizer 'adam' in the checkpoint, 'sgd' now",
    )
    status, out, err = run(capsys, *common, "--resume", "--epochs", "3")
    assert status == 0 and "resuming from epoch 2 of" in err and "epoch 3/3" in out and "epoch 2/3" not in out
    assert run(capsys, *common, "--overwrite", "--epochs", "1")[0] == 0
    assert checkpoint.read_metadata(path)["epoch"] == 1
    (tmp_path / "garbage.npz").write_bytes(b"not a checkpoint at all")
    status, _, err = run(capsys, "train", "--checkpoint", str(tmp_path / "garbage.npz"), "--resume")
    one_line_error(status, err, "truncated or corrupted checkpoint, or another kind of file")
    assert "pickle" not in err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--model", "cnn", "--layers", "32"], "--layers builds --model mlp only"),
        (["--model", "transformer", "--activation", "tanh"], "--activation builds --model mlp only"),
        (["--model", "cnn", "--compute-dtype", "bfloat16"], "--compute-dtype applies to --model mlp only"),
        (["--model-devices", "2"], "--model-devices sets the tensor-parallel group: it needs --layout tensor"),
        (["--layout", "fsdp"], "--layout fsdp shards the parameters over devices: give --devices N"),
        (["--context", "64"], "--context applies to --model gpt only"),
        (["--warmup-epochs", "2"], "--warmup-epochs applies to --schedule warmup-cosine"),
        (["--dp-clip", "1"], "DP-SGD needs both --dp-clip C and --dp-noise SIGMA"),
        (["--dp-delta", "1e-5"], "--dp-delta applies to DP-SGD"),
        (["--dp-clip", "1", "--dp-noise", "1", "--grad", "autodiff"], "train with --grad manual"),
        (["--optimizer", "kfac", "--schedule", "cosine"], "--optimizer kfac takes a constant --lr"),
        (["--optimizer", "ekfac", "--weight-decay", "0.1"], "--optimizer ekfac takes a constant --lr"),
        (["--loss", "mse"], "--loss mse needs --data with numeric targets"),
        (["--resume", "--overwrite", "--checkpoint", "x.npz"], "--resume and --overwrite contradict"),
        (["--dp-noise", "-1"], "expected a number >= 0"),
    ],
)
def test_flags_that_would_be_ignored_are_refused_in_their_own_terms(capsys, argv, fragment):
    status, _, err = run(capsys, "train", *argv)
    one_line_error(status, err, fragment)
    assert not re.search(r"\b[a-z_]+=", err), err  # in flags, never in Python's keyword arguments


def test_a_gradient_that_is_zero_in_exact_arithmetic_says_why_it_agrees(capsys):
    """The transformer's key bias has a zero gradient, so its relative error is rounding over rounding: the line
    must say that it agrees by its absolute error, not print an error above the tolerance as "agree"."""
    from mnet.cli.reporting import gradient_check

    net = mnet.serial(mnet.Embedding(6, 8), mnet.MultiHeadSelfAttention(2), mnet.LastStep(), mnet.Dense(3))
    _, params = net.init(__import__("jax").random.key(0), (5,))
    rng = np.random.default_rng(0)
    ids, labels = rng.integers(0, 6, (40, 5)).astype(np.int32), rng.integers(0, 3, 40).astype(np.int32)
    dataset = data.Dataset(ids, labels, ids, labels, 3, "ids")
    said = []
    gradient_check(net, mnet.losses.softmax_cross_entropy, params, dataset, 16, said.append)
    worst = float(said[0].split("largest relative error ")[1].split()[0])
    tolerance = float(said[0].split("(tolerance ")[1].split(")")[0])
    assert worst > tolerance  # the key bias's rounding noise
    assert "agree (the leaf above it, [1]['k']['b'], zero in exact arithmetic" in said[0]


def test_dp_sgd_reports_the_privacy_it_spent(capsys):
    status, out, err = run(
        capsys, "train", "--dp-clip", "1", "--dp-noise", "1.1", "--epochs", "2", "--batch-size", "64", "--lr", "0.5",
        "--optimizer", "sgd", "--layers", "32", "--dp-delta", "1e-5", "--json",
    )  # fmt: skip
    assert status == 0, err
    summary = json.loads(out.splitlines()[-1])
    n = len(data.load_digits(0).x_train)
    expected = mnet.dp_epsilon(1.1, 64 / n, 2 * (n // 64), 1e-5, examples=n)
    assert summary["dp_epsilon"] == pytest.approx(expected) and summary["dp_delta"] == 1e-5
    assert "Poisson-sampled steps" in err and summary["test_accuracy"] > 0.5


def test_regression_trains_evaluates_and_predicts(capsys, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 4)) * [1, 10, 0.1, 3] + 5  # standardised by the loader, and again by predict
    y = (x - 5) @ [1.0, -0.1, 4.0, 0.3] + 0.05 * rng.normal(size=600)
    np.savez(tmp_path / "reg.npz", x=x, y=y)
    ckpt, out_path = str(tmp_path / "r.npz"), str(tmp_path / "p.npz")
    status, out, err = run(
        capsys, "train", "--data", str(tmp_path / "reg.npz"), "--loss", "mse", "--epochs", "30", "--layers", "",
        "--schedule", "warmup-cosine", "--warmup-epochs", "2", "--weight-decay", "1e-5", "--lr", "0.05",
        "--checkpoint", ckpt, "--json",
    )  # fmt: skip
    assert status == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["test_accuracy"] is None and summary["test_loss"] < 0.05  # a linear model of linear data
    status, out, err = run(capsys, "eval", "--checkpoint", ckpt, "--json")
    assert status == 0, err and json.loads(out)["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)
    np.save(tmp_path / "raw.npy", x[:7])
    assert (
        run(capsys, "predict", "--checkpoint", ckpt, "--input", str(tmp_path / "raw.npy"), "--output", out_path)[0] == 0
    )
    np.testing.assert_allclose(np.load(out_path)["outputs"][:, 0], y[:7], atol=0.5)


@pytest.mark.parametrize("model", ["mlp", "cnn", "transformer"])
def test_eval_and_predict_from_the_checkpoint_alone(capsys, tmp_path, model):
    """A trained model used without the script that built it: eval reproduces the run's own test figures, predict
    labels raw inputs, and a checkpoint whose network description was edited is refused."""
    ckpt = str(tmp_path / "m.safetensors")
    argv = ["train", "--model", model, "--epochs", "1", "--checkpoint", ckpt, "--json"]
    status, out, err = run(capsys, *argv + (["--layers", "32"] if model == "mlp" else []))
    assert status == 0, err
    trained = json.loads(out.splitlines()[-1])
    status, out, err = run(capsys, "eval", "--checkpoint", ckpt, "--json")
    assert status == 0, err
    evaluated = json.loads(out)
    assert evaluated["accuracy"] == pytest.approx(trained["test_accuracy"], abs=1e-6)
    assert evaluated["loss"] == pytest.approx(trained["test_loss"], rel=1e-5)

    if model == "transformer":
        dataset = data.load_odd_one_out(0)
        raw, labels = dataset.x_test[:50], dataset.y_test[:50]
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        raw, labels = digits.data[:50], digits.target[:50]
    np.save(tmp_path / "raw.npy", raw)
    out_path = str(tmp_path / "p.npz")
    predict = ("predict", "--checkpoint", ckpt, "--input", str(tmp_path / "raw.npy"), "--output", out_path)
    assert run(capsys, *predict)[0] == 0
    predicted = np.load(out_path)
    assert predicted["labels"].shape == (50,) and np.allclose(predicted["predictive"].sum(-1), 1, atol=1e-5)
    assert np.mean(predicted["labels"] == labels) > 0.25  # one epoch: well above chance (0.1, 1/16)
    one_line_error(*run(capsys, *predict)[::2], "already exists")
    np.save(tmp_path / "wrong.npy", raw[:, :-1])
    wrong = ("predict", "--checkpoint", ckpt, "--input", str(tmp_path / "wrong.npy"), "--output", out_path + "2")
    one_line_error(*run(capsys, *wrong)[::2], "the network takes examples of shape")

    tampered = tmp_path / "tampered.safetensors"
    with safetensors.safe_open(ckpt, framework="np") as file:
        header = file.metadata()
    manifest = header["manifest"]
    edited = manifest.replace('"layer": "Relu"', '"layer": "Tanh"').replace('"Gelu"', '"Tanh"')
    assert edited != manifest or model == "transformer"
    edited = edited.replace('"layer": "Dense"', '"layer": "os.system"', 1)
    safetensors.numpy.save_file(safetensors.numpy.load_file(ckpt), tampered, metadata={**header, "manifest": edited})
    one_line_error(*run(capsys, "eval", "--checkpoint", str(tampered))[::2], "edited after it was written")
