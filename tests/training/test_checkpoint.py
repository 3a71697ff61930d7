"""save_params / load_params: safetensors files that other readers open, exact round trips, atomic writes, the
earlier format still read, and clear refusals."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import mnet
from mnet.errors import CheckpointError
from mnet.training import checkpoint
from tests.helpers import assert_trees_close

NET = mnet.serial(mnet.Dense(6), mnet.Relu(), mnet.Dense(3))


@pytest.fixture
def params():
    return NET.init(jax.random.key(0), (4,), jnp.float32)[1]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16])
def test_round_trip_is_exact(tmp_path, dtype):
    _, params = NET.init(jax.random.key(0), (4,), dtype)
    mnet.save_params(tmp_path / "p.npz", params)
    loaded = mnet.load_params(tmp_path / "p.npz", params)
    assert_trees_close(loaded, params, 0)
    assert loaded[1] == ()
    mnet.save_params(tmp_path / "s.safetensors", {"scalar": jnp.array(2, jnp.int32)})
    assert mnet.load_params(tmp_path / "s.safetensors", {"scalar": jnp.array(0, jnp.int32)})["scalar"].shape == ()


def test_missing_truncated_corrupted(tmp_path, params):
    path = tmp_path / "p.npz"
    with pytest.raises(CheckpointError, match=r"p.npz: no such checkpoint file"):
        mnet.load_params(path, params)
    mnet.save_params(path, params)
    good = path.read_bytes()
    for cut in (10, len(good) // 2, len(good) - 1):
        path.write_bytes(good[:cut])
        with pytest.raises(CheckpointError, match=r"p.npz: truncated or corrupted"):
            mnet.load_params(path, params)
    # Flip one byte inside a weight's payload: the zip CRC or the SHA-256 must catch it.
    W_bytes = np.asarray(params[0]["W"]).tobytes()
    where = good.index(W_bytes) + 5
    path.write_bytes(good[:where] + bytes([good[where] ^ 0x40]) + good[where + 1 :])
    with pytest.raises(CheckpointError, match=r"p.npz: (truncated or corrupted|corrupted checkpoint)"):
        mnet.load_params(path, params)


def test_mismatched_structure_shape_dtype(tmp_path, params):
    path = tmp_path / "p.npz"
    mnet.save_params(path, params)
    _, wider = mnet.serial(mnet.Dense(7), mnet.Relu(), mnet.Dense(3)).init(jax.random.key(0), (4,), jnp.float32)
    with pytest.raises(CheckpointError, match=r"leaf \[0\]\['W'\] has shape \(4, 6\), expected \(4, 7\)"):
        mnet.load_params(path, wider)
    with pytest.raises(CheckpointError, match=r"leaf \[0\]\['W'\] has dtype float32, expected float64"):
        mnet.load_params(path, jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params))
    with pytest.raises(CheckpointError, match=r"structure differs.*missing \[3\]\['W'\]"):
        mnet.load_params(path, params + ({"W": jnp.zeros((3, 2))},))


def test_never_unpickles(tmp_path, params):
    path = tmp_path / "evil.npz"
    np.savez(path, manifest=np.array([object()], dtype=object))
    with pytest.raises(CheckpointError, match="evil.npz"):
        mnet.load_params(path, params)


def test_a_crash_during_writing_leaves_the_old_file(tmp_path, params, monkeypatch):
    path = tmp_path / "p.npz"
    mnet.save_params(path, params)
    before = path.read_bytes()

    def crash(descriptor):  # the bytes are written, the power fails before they reach the disk
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        mnet.save_params(path, jax.tree_util.tree_map(lambda p: p + 1, params))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["p.npz"]


def test_any_safetensors_reader_opens_the_file_by_the_documented_names(tmp_path, params):
    mnet.save_params(tmp_path / "p.safetensors", params)
    tensors = safetensors.numpy.load_file(tmp_path / "p.safetensors")
    assert sorted(tensors) == ["0.W", "0.b", "2.W", "2.b"]
    for name, leaf in (("0.W", params[0]["W"]), ("2.b", params[2]["b"])):
        np.testing.assert_array_equal(tensors[name], np.asarray(leaf))
    with safetensors.safe_open(tmp_path / "p.safetensors", framework="np") as file:
        header = file.metadata()
    assert header["format"] == "mnet-safetensors-v1" and header["mnet_version"]


def test_a_training_checkpoints_entries_are_prefixed_and_its_metadata_read_alone(tmp_path, params):
    state = {"count": jnp.array(7, jnp.int32), "mu": jax.tree_util.tree_map(jnp.zeros_like, params)}
    checkpoint.save_tree(tmp_path / "run.safetensors", (params, state), {"epoch": 4, "seed": [1, 2]})
    names = sorted(safetensors.numpy.load_file(tmp_path / "run.safetensors"))
    assert names[:4] == ["0.0.W", "0.0.b", "0.2.W", "0.2.b"] and "1.count" in names and "1.mu.0.W" in names
    assert checkpoint.read_metadata(tmp_path / "run.safetensors") == {"epoch": 4, "seed": [1, 2]}
    entry, _ = checkpoint.read_entry(tmp_path / "run.safetensors", 0, params)
    assert_trees_close(entry, params, 0)


def legacy_params():
    """The tree kept in tests/training/data/params-mnet-pytree-v1.npz, written by mnet's earlier save_tree (computed
    in NumPy as it was then: XLA's float32 division may differ in the last bit)."""
    first = {"W": np.arange(24, dtype=np.float32).reshape(4, 6) / 7, "b": np.arange(6, dtype=np.float32) - 2.5}
    last = {
        "W": (np.arange(18, dtype=np.float32).reshape(6, 3) / 3).astype(jnp.bfloat16),
        "b": np.zeros(3, jnp.bfloat16),
    }
    return jax.tree_util.tree_map(jnp.asarray, [first, (), last])


def test_a_file_of_the_earlier_npz_format_still_loads():
    path = Path(__file__).parent / "data" / "params-mnet-pytree-v1.npz"
    assert_trees_close(mnet.load_params(path, legacy_params()), legacy_params(), 0)
    assert checkpoint.read_metadata(path) == {"epoch": 3}


def test_a_safetensors_file_written_by_another_tool_loads_by_name(tmp_path, params):
    tensors = {"2.b": np.asarray(params[2]["b"]), "0.W": np.asarray(params[0]["W"]), "0.b": np.asarray(params[0]["b"])}
    safetensors.numpy.save_file({**tensors, "2.W": np.asarray(params[2]["W"])}, tmp_path / "theirs.safetensors")
    assert_trees_close(mnet.load_params(tmp_path / "theirs.safetensors", params), params, 0)
    safetensors.numpy.save_file({**tensors, "2.V": np.asarray(params[2]["W"])}, tmp_path / "odd.safetensors")
    with pytest.raises(
        CheckpointError, match=r"odd.safetensors: structure differs.*missing \[2\]\['W'\]; unexpected 2.V"
    ):
        mnet.load_params(tmp_path / "odd.safetensors", params)


def test_a_leaf_safetensors_cannot_hold_is_refused_by_its_path(tmp_path, params):
    with pytest.raises(CheckpointError, match=r"cannot save leaf \[0\]\['W'\]: safetensors has no dtype complex128"):
        mnet.save_params(tmp_path / "p.safetensors", [{"W": jnp.zeros(2, jnp.complex128)}])
    with pytest.raises(CheckpointError, match="two leaves would share the tensor name 'a.b'"):
        mnet.save_params(tmp_path / "p.safetensors", {"a.b": jnp.zeros(1), "a": {"b": jnp.zeros(1)}})
    assert not (tmp_path / "p.safetensors").exists()


def test_a_file_gets_the_permissions_of_any_new_file(tmp_path, params):
    mask = os.umask(0o027)
    try:
        mnet.save_params(tmp_path / "p.safetensors", params)
    finally:
        os.umask(mask)
    assert (tmp_path / "p.safetensors").stat().st_mode & 0o777 == 0o640
