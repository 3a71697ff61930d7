"""Sharded checkpoints (orbax, a directory named *.orbax) in one process: exact round trips with their metadata, one
step kept, a training run resumed to the uninterrupted result, and clear refusals. Two processes writing their
own shards are tests/training/test_multiprocess.py's."""

import builtins

import jax
import jax.numpy as jnp
import optax
import pytest

import mnet
from mnet.errors import CheckpointError
from mnet.training import sharded_checkpoint
from tests.helpers import assert_trees_close, run_mnet

pytest.importorskip("orbax.checkpoint", reason="needs orbax-checkpoint (pip install mnet[orbax])")
CE = mnet.losses.softmax_cross_entropy


def digits(n=256):
    full = mnet.data.load_digits(0)
    return mnet.data.Dataset(full.x_train[:n], full.y_train[:n], full.x_test, full.y_test, 10, "digits")


def test_a_round_trip_is_exact_and_keeps_one_step(tmp_path):
    tree = ({"W": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}, (jnp.array(7, jnp.int32),))
    path = tmp_path / "run.orbax"
    sharded_checkpoint.save_sharded(path, tree, {"epoch": 1})
    sharded_checkpoint.save_sharded(path, jax.tree_util.tree_map(lambda a: a * 2, tree), {"epoch": 2})
    assert [entry.name for entry in path.iterdir() if entry.name.isdigit()] == ["2"]
    assert sharded_checkpoint.read_sharded_metadata(path) == {"epoch": 2}
    restored, meta = sharded_checkpoint.read_sharded(path, tree)
    assert_trees_close(restored, jax.tree_util.tree_map(lambda a: a * 2, tree), 0)
    assert meta == {"epoch": 2}


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    data, net = digits(), mnet.mlp([24, 10], "elu")
    _, params = net.init(jax.random.key(1), (64,))
    options = dict(optimizer=optax.adam(3e-3), batch_size=32, seed=7)
    whole = mnet.fit(net, CE, params, data, epochs=3, **options)
    path = tmp_path / "run.orbax"
    mnet.fit(net, CE, params, data, epochs=2, checkpoint_path=path, **options)
    resumed = mnet.fit(net, CE, params, data, epochs=3, checkpoint_path=path, resume=True, **options)
    assert resumed.history.epoch == [1, 2, 3]
    assert_trees_close(resumed.params, whole.params, 0)
    with pytest.raises(CheckpointError, match="already exists"):
        mnet.fit(net, CE, params, data, epochs=1, checkpoint_path=path, **options)
    with pytest.raises(CheckpointError, match="other settings: batch_size 32 in the checkpoint, 16 now$"):
        mnet.fit(net, CE, params, data, epochs=4, checkpoint_path=path, resume=True, **{**options, "batch_size": 16})


def test_a_checkpoint_that_does_not_fit_is_refused_by_leaf(tmp_path, monkeypatch):
    path = tmp_path / "p.orbax"
    with pytest.raises(CheckpointError, match=r"p.orbax: no sharded checkpoint there"):
        sharded_checkpoint.read_sharded(path, {"W": jnp.zeros(2)})
    sharded_checkpoint.save_sharded(path, {"W": jnp.zeros((2, 3))})
    with pytest.raises(CheckpointError, match=r"leaf \['W'\] has shape \[2, 3\], expected \[3, 2\]"):
        sharded_checkpoint.read_sharded(path, {"W": jnp.zeros((3, 2))})
    with pytest.raises(CheckpointError, match=r"leaf \['W'\] has dtype float64, expected float32"):
        sharded_checkpoint.read_sharded(path, {"W": jnp.zeros((2, 3), jnp.float32)})
    with pytest.raises(CheckpointError, match=r"missing \[\"\['V'\]\"\], unexpected \[\"\['W'\]\"\]"):
        sharded_checkpoint.read_sharded(path, {"V": jnp.zeros((2, 3))})

    real_import = builtins.__import__

    def without_orbax(name, *args, **kwargs):
        if name.startswith("orbax"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_orbax)
    with pytest.raises(CheckpointError, match=r"needs orbax-checkpoint: pip install 'mnet\[orbax\]'"):
        sharded_checkpoint.read_sharded(path, {"W": jnp.zeros((2, 3))})


def test_the_cli_trains_resumes_and_evaluates_a_sharded_checkpoint(tmp_path):
    path = tmp_path / "run.orbax"
    assert run_mnet("train", "--epochs", "1", "--checkpoint", str(path)).returncode == 0
    resumed = run_mnet("train", "--epochs", "2", "--checkpoint", str(path), "--resume")
    assert resumed.returncode == 0 and "epoch 2/2" in resumed.stdout and "epoch 1/2" not in resumed.stdout
    evaluated = run_mnet("eval", "--checkpoint", str(path), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert sharded_checkpoint.read_sharded_metadata(path)["epoch"] == 2
