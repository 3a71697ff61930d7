"""save_params / load_params: exact round trips, atomic writes, and clear refusals."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnet
from mnet.errors import CheckpointError
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

    def crash(file, **arrays):
        file.write(b"half a file")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        mnet.save_params(path, jax.tree_util.tree_map(lambda p: p + 1, params))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["p.npz"]
