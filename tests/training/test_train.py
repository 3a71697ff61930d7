"""Training: hand-derived vs autodiff trajectories, resume, divergence, and `mnet train` end to end."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mnet
from mnet import train
from mnet.errors import CheckpointError, DivergenceError
from mnet.training import checkpoint, data
from tests.helpers import assert_trees_close, run_mnet

CE = mnet.losses.softmax_cross_entropy


def small_digits(seed=0, n=400):
    full = data.load_digits(seed)
    return data.Dataset(full.x_train[:n], full.y_train[:n], full.x_test[:100], full.y_test[:100], 10, "digits-small")


def test_hand_and_autodiff_training_follow_the_same_path_in_float64():
    dataset = small_digits()
    net = mnet.serial(mnet.Dense(32), mnet.Tanh(), mnet.Dense(16), mnet.Gelu(), mnet.Dense(10))
    _, params = net.init(jax.random.key(0), (64,), jnp.float64)
    runs = {
        grad: train.fit(
            net, CE, params, dataset, optimizer=optax.sgd(0.05, momentum=0.9), epochs=4, batch_size=25, grad=grad
        )
        for grad in ("manual", "autodiff")
    }
    assert runs["manual"].params[0]["W"].dtype == jnp.float64
    assert_trees_close(runs["manual"].params, runs["autodiff"].params, 1e-9)
    np.testing.assert_allclose(runs["manual"].history.train_loss, runs["autodiff"].history.train_loss, rtol=1e-10)
    assert runs["manual"].history.train_loss[-1] < runs["manual"].history.train_loss[0]


def test_fit_does_not_consume_the_callers_params():
    dataset = small_digits(n=64)
    net = mnet.mlp([10])
    _, params = net.init(jax.random.key(0), (64,))
    before = jax.tree_util.tree_map(np.array, params)
    train.fit(net, CE, params, dataset, epochs=1, batch_size=32)
    assert_trees_close(jax.tree_util.tree_map(np.asarray, params), before, 0)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    dataset = small_digits()
    net = mnet.mlp([24, 10], "elu")
    _, params = net.init(jax.random.key(1), (64,))
    options = dict(optimizer=optax.adam(3e-3), batch_size=32, seed=7)
    whole = train.fit(net, CE, params, dataset, epochs=5, **options)
    path = tmp_path / "run.ckpt.npz"
    train.fit(net, CE, params, dataset, epochs=2, checkpoint_path=path, **options)  # "interrupted" after 2
    resumed = train.fit(net, CE, params, dataset, epochs=5, checkpoint_path=path, resume=True, **options)
    assert resumed.history.epoch == [1, 2, 3, 4, 5]
    assert_trees_close(resumed.params, whole.params, 0)
    assert_trees_close(resumed.opt_state, whole.opt_state, 0)
    np.testing.assert_array_equal(resumed.history.train_loss, whole.history.train_loss)
    with pytest.raises(CheckpointError, match="other settings: batch_size 32 in the checkpoint, 16 now$"):
        train.fit(
            net, CE, params, dataset, epochs=6, checkpoint_path=path, resume=True, **{**options, "batch_size": 16}
        )


def test_truncated_training_checkpoint_is_refused(tmp_path):
    dataset = small_digits(n=64)
    net = mnet.mlp([10])
    _, params = net.init(jax.random.key(0), (64,))
    path = tmp_path / "run.npz"
    train.fit(net, CE, params, dataset, epochs=1, batch_size=32, checkpoint_path=path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"run.npz: truncated or corrupted"):
        train.fit(net, CE, params, dataset, epochs=2, batch_size=32, checkpoint_path=path, resume=True)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    dataset = small_digits(n=320)
    net = mnet.mlp([16, 10])
    _, params = net.init(jax.random.key(0), (64,))
    steps_per_epoch = 320 // 32
    exploding = optax.sgd(lambda step: jnp.where(step < 2 * steps_per_epoch, 0.01, 1e30))
    path = tmp_path / "good.npz"
    with pytest.raises(DivergenceError, match=r"diverged at epoch 3: the training loss is nan.*still holds epoch 2"):
        train.fit(net, CE, params, dataset, optimizer=exploding, epochs=5, batch_size=32, checkpoint_path=path)
    (kept, _), meta = checkpoint.read_tree(path, (params, exploding.init(params)))
    assert meta["epoch"] == 2 and all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(kept))


def run_cli(*args, cwd=None):
    """The real entry point, a fresh interpreter: for the runs that must be exactly a user's."""
    return subprocess.run([sys.executable, "-m", "mnet", *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_cli_train_json_small(tmp_path):
    plot = tmp_path / "curves.png"
    result = run_cli("train", "--epochs", "2", "--json", "--plot", str(plot), "--save-params", str(tmp_path / "p.npz"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0.5 < summary["test_accuracy"] <= 1 and summary["train_loss"] > 0
    assert summary["gradient_check_max_rel_error"] < 1e-4
    assert "gradient check on one batch" in result.stderr and "agree" in result.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    net = mnet.mlp([256, 10])
    _, like = net.init(jax.random.key(0), (64,), jnp.float32)  # the CLI trains in float32
    assert mnet.load_params(tmp_path / "p.npz", like)[0]["W"].shape == (64, 256)


@pytest.mark.slow
def test_cli_default_training_reaches_97_percent():
    """The README's main job, exactly as a new user runs it (about 5 s on 2 cores; CI runs it)."""
    result = run_cli("train", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["test_accuracy"] >= 0.97
    assert summary["seconds"] < 60


def test_cli_resume_continues_to_the_same_result(tmp_path):
    ckpt = tmp_path / "ck.npz"
    common = ["--layers", "32", "--batch-size", "64", "--json", "--checkpoint", str(ckpt)]
    whole = run_mnet("train", "--epochs", "4", *common[:-2], "--json")
    first = run_mnet("train", "--epochs", "2", *common)
    resumed = run_mnet("train", "--epochs", "4", "--resume", *common)
    assert first.returncode == resumed.returncode == whole.returncode == 0, resumed.stderr
    assert (
        json.loads(resumed.stdout.splitlines()[-1])["test_accuracy"]
        == json.loads(whole.stdout.splitlines()[-1])["test_accuracy"]
    )
    assert "epoch 3/4" in resumed.stderr and "epoch 1/4" not in resumed.stderr


def test_cli_divergence_exits_nonzero_with_one_line():
    result = run_mnet("train", "--optimizer", "sgd", "--lr", "1e30", "--epochs", "3")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mnet train: error: training diverged at epoch 1") and "Traceback" not in result.stderr


def write_bad_data(tmp_path, case):
    if case == "missing":
        return tmp_path / "nope.npz", "no such file"
    if case == "format":
        (tmp_path / "d.txt").write_text("hello")
        return tmp_path / "d.txt", "unknown format"
    if case == "not_npz":
        (tmp_path / "d.npz").write_text("not a zip")
        return tmp_path / "d.npz", "not a readable .npz"
    if case == "npz_keys":
        np.savez(tmp_path / "d.npz", features=np.zeros((4, 2)))
        return tmp_path / "d.npz", "missing array(s) x, y"
    if case == "lengths":
        np.savez(tmp_path / "d.npz", x=np.zeros((10, 3)), y=np.zeros(9, int))
        return tmp_path / "d.npz", "10 examples but 9 labels"
    if case == "non_numeric":
        (tmp_path / "d.csv").write_text("a,b,label\n1,2,0\n3,oops,1\n")
        return tmp_path / "d.csv", "line 3, column 2: non-numeric value 'oops'"
    if case == "fractional_labels":
        (tmp_path / "d.csv").write_text("1,2,0\n3,4,1.5\n5,6,1\n")
        return tmp_path / "d.csv", "labels must be integers 0..K-1, found 1.5"
    if case == "negative_labels":
        np.savez(tmp_path / "d.npz", x=np.zeros((4, 3)), y=np.array([0, 1, -1, 1]))
        return tmp_path / "d.npz", "labels must be integers 0..K-1, found -1"
    if case == "ragged_csv":
        (tmp_path / "d.csv").write_text("1,2,0\n3,4\n")
        return tmp_path / "d.csv", "line 2 has 2 fields, expected 3"
    if case == "idx_truncated":
        (tmp_path / "train-images-idx3-ubyte").write_bytes(
            b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") * 3 + b"\x00" * 10
        )
        (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x00" * 5)
        return tmp_path / "train-images-idx3-ubyte", "IDX header promises (5, 5, 5)"
    raise AssertionError(case)


BAD_CASES = [
    "missing",
    "format",
    "not_npz",
    "npz_keys",
    "lengths",
    "non_numeric",
    "fractional_labels",
    "negative_labels",
    "ragged_csv",
    "idx_truncated",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_data_is_one_clear_line(tmp_path, case):
    path, message = write_bad_data(tmp_path, case)
    with pytest.raises(mnet.DataError, match=None) as caught:
        data.load(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


@pytest.mark.parametrize("case", ["missing", "non_numeric", "fractional_labels", "lengths"])
def test_cli_bad_data_exits_nonzero_without_traceback(tmp_path, case):
    path, message = write_bad_data(tmp_path, case)
    result = run_mnet("train", "--data", str(path), "--epochs", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.count("\n") == 1 and message in result.stderr and result.stderr.startswith("mnet train: error:")
    )


def test_user_data_formats_load_and_train(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0).astype(int)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    header = "f1,f2,label,f3,f4\n"
    rows = "".join(f"{a},{b},{c},{d},{e}\n" for (a, b, d, e), c in zip(x, y))
    (tmp_path / "d.csv").write_text(header + rows)
    for name in ("d.npz", "d.csv"):
        dataset = data.load(tmp_path / name, seed=3)
        assert dataset.num_classes == 3 and dataset.example_shape == (4,) and len(dataset.x_train) == 48
        np.testing.assert_allclose(dataset.x_train.mean(0), 0, atol=1e-6)
    np.testing.assert_array_equal(
        data.load(tmp_path / "d.npz", seed=3).y_test, data.load(tmp_path / "d.csv", seed=3).y_test
    )
    result = run_mnet("train", "--data", str(tmp_path / "d.csv"), "--epochs", "2", "--batch-size", "8", "--json")
    assert result.returncode == 0, result.stderr


def write_idx(_, array):
    codes = {np.dtype("u1"): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def test_idx_plain_and_gzipped(tmp_path):
    import gzip

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 4, 5), dtype=np.uint8)
    labels = rng.integers(0, 3, 30).astype(np.uint8)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(write_idx(None, images)))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(write_idx(None, labels)))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(write_idx(None, images[:10]))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(write_idx(None, labels[:10]))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    dataset = data.load(tmp_path)
    assert dataset.example_shape == (20,) and len(dataset.x_train) == 30 and len(dataset.x_test) == 10
    np.testing.assert_array_equal(dataset.y_test, labels[:10])


def test_non_finite_data_is_refused_before_any_step():
    dataset = small_digits()
    net = mnet.mlp([10])
    _, params = net.init(jax.random.key(0), (64,))
    x = dataset.x_train.copy()
    x[3, 5] = np.nan
    poisoned = data.Dataset(x, dataset.y_train, dataset.x_test, dataset.y_test, 10, "poisoned")
    with pytest.raises(mnet.DataError, match="fit: x_train holds 1 NaN or infinite values"):
        train.fit(net, CE, params, poisoned, epochs=1)


def test_parameters_that_go_non_finite_stop_training_whatever_the_activations_hide(tmp_path):
    """An activation that maps NaN to a number (as mnet's ReLU once did) keeps the loss finite while the parameters
    are NaN: the parameters are checked too, and the checkpoint keeps the last good epoch."""

    class HidesNaN(mnet.Tanh):
        def forward(self, params, x):
            y, cache = super().forward(params, x)
            return jnp.nan_to_num(y, nan=0.0), cache

    net = mnet.serial(mnet.Dense(8), HidesNaN(), mnet.Dense(10))
    _, params = net.init(jax.random.key(0), (64,))

    def poison_at(step):
        def update(updates, count, params=None):
            first = jax.tree_util.tree_map(lambda u: jnp.where(count >= step, jnp.nan, u), updates[0])
            return (first, *updates[1:]), count + 1  # only the layer before the activation that hides NaN

        return optax.GradientTransformation(lambda p: jnp.zeros((), jnp.int32), update)

    optimizer = optax.chain(optax.sgd(0.1), poison_at(30))  # 400 examples in batches of 32: epoch 3
    path = tmp_path / "run.npz"
    with pytest.raises(DivergenceError, match=r"epoch 3: a parameter is NaN or infinite.*still holds epoch 2"):
        train.fit(net, CE, params, small_digits(), optimizer=optimizer, epochs=5, checkpoint_path=path)
    assert checkpoint.read_metadata(path)["epoch"] == 2


def test_fit_never_overwrites_a_checkpoint_unasked_and_names_what_differs(tmp_path):
    dataset, net = small_digits(), mnet.mlp([10])
    _, params = net.init(jax.random.key(0), (64,))
    path = tmp_path / "run.npz"
    train.fit(net, CE, params, dataset, epochs=1, checkpoint_path=path)
    with pytest.raises(CheckpointError, match="already exists: resume from it, or overwrite it explicitly"):
        train.fit(net, CE, params, dataset, epochs=1, checkpoint_path=path)
    with pytest.raises(CheckpointError, match="the optimizer state in the file does not match this run's"):
        train.fit(net, CE, params, dataset, epochs=2, checkpoint_path=path, resume=True, optimizer=optax.sgd(0.1))
    assert train.fit(net, CE, params, dataset, epochs=1, checkpoint_path=path, overwrite=True).history.epoch == [1]
