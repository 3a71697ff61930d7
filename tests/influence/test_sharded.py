"""Influence across devices: on 4 forced host devices every preconditioner's scores, self-influence and damping
equal the single device's (float64, only the order of the sums differs), a padded set's too; the training chunks
really are split (each device holds a quarter of a chunk's per-example gradients in the compiled program, by XLA's
memory analysis); and the refusals."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnet
from mnet.errors import SettingError

SCRIPT = textwrap.dedent("""
    import json, jax, jax.numpy as jnp, numpy as np, mnet
    from mnet.influence import scores as S
    jax.config.update("jax_enable_x64", True)
    assert len(jax.devices()) == 4, jax.devices()
    loss, out, rng = mnet.losses.softmax_cross_entropy, {}, np.random.default_rng(0)

    def gaps(one, four, *query):
        s1, s4 = one.scores(*query), four.scores(*query)
        i1, i4 = one.self_influence(), four.self_influence()
        return [float(jnp.max(jnp.abs(s1 - s4)) / jnp.max(jnp.abs(s1))),
                float(jnp.max(jnp.abs(i1 - i4)) / jnp.max(jnp.abs(i1))), abs(one.damping - four.damping) / one.damping]

    net = mnet.serial(mnet.Dense(6), mnet.Tanh(), mnet.Dense(3))
    _, params = net.init(jax.random.key(0), (5,), dtype=jnp.float64)
    x, y = rng.normal(size=(50, 5)), rng.integers(0, 3, 50)  # chunks of 16, 16, 16 split; the last 2 replicated
    for name in ("identity", "diag", "kfac", "ekfac", "ggn"):
        fits = [mnet.influence(net, loss, params, x, y, preconditioner=name, batch_size=16, devices=d) for d in (None, 4)]
        out[name] = gaps(*fits, x[:3] + 0.1, y[:3])
    V, T = 7, 5
    attention = mnet.MultiHeadSelfAttention(2, num_kv_heads=1, rope_base=50.0, use_bias=False)
    encoder = mnet.serial(mnet.Embedding(V, 8), mnet.residual(mnet.serial(mnet.RMSNorm(), attention)), mnet.Dense(V))
    _, encoder_params = encoder.init(jax.random.key(0), (T,), dtype=jnp.float64)
    ids = rng.integers(0, V, (20, T))
    masks = np.arange(T)[None] < rng.integers(1, T + 1, 20)[:, None]
    fits = [mnet.influence(encoder, loss, encoder_params, ids, np.roll(ids, -1, 1), mask=masks, batch_size=8,
                           fallback="diag", devices=d) for d in (None, 4)]
    out["masked"] = gaps(*fits, ids[:2], np.roll(ids, -1, 1)[:2], masks[:2])
    wide = mnet.mlp([64, 256, 256, 10])
    _, wide_params = wide.init(jax.random.key(1), (64,), dtype=jnp.float64)
    xw, yw = jnp.asarray(rng.normal(size=(128, 64))), jnp.asarray(rng.integers(0, 10, 128))
    for devices in (None, 4):
        fit = mnet.influence(wide, loss, wide_params, xw, yw, preconditioner="diag", batch_size=128, devices=devices)
        chunk = fit.place_chunk((xw, yw, None))
        compiled = S.preconditioned_gradients.lower(wide, loss, S.static(fit.preconditioner), fit.params, *chunk,
                                                    S.arrays_of(fit.preconditioner)).compile()
        scored = S.scores_chunk(wide, loss, fit.params, fit.preconditioned_queries(xw[:2], yw[:2]), *chunk)
        out[str(devices)] = {"gradient_bytes": compiled.memory_analysis().output_size_in_bytes,
                             "rows": list(getattr(chunk[0].sharding, "spec", [])), "scores": list(getattr(scored.sharding, "spec", []))}
    try:
        mnet.influence(net, loss, params, x, y, batch_size=18, devices=4)
    except ValueError as error:
        out["odd_batch"] = str(error)
    print(json.dumps(out))
""")


def test_influence_on_four_devices_equals_one_and_splits_the_chunks():
    env = dict(
        os.environ,
        XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
    )
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("identity", "diag", "kfac", "ekfac", "ggn", "masked"):
        assert max(out[name]) < 1e-12, (name, out[name])
    assert out["None"]["rows"] == [] and out["4"]["rows"] == ["data"] and out["4"]["scores"] == [None, "data"]
    # the compiled program's outputs hold every per-example gradient and its solve of the 128-row chunk, at least
    # 2 x 128 x 85,002 float64 on one device (with XLA's buffer padding), and a quarter of that on each of four
    whole = 2 * 128 * (64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10) * 8
    one, four = out["None"]["gradient_bytes"], out["4"]["gradient_bytes"]
    assert whole <= one <= 1.06 * whole and abs(four - one / 4) <= 1024, (one, four)
    assert out["odd_batch"] == "influence: batch_size 18 must be divisible by the 4 devices"


def test_influence_devices_refusals():
    """More devices than there are, or a devices that is not a count, is refused in one line; devices=1 is one
    device."""
    net = mnet.serial(mnet.Dense(3))
    _, params = net.init(jax.random.key(0), (2,))
    x, y = jnp.ones((4, 2)), jnp.zeros(4, jnp.int32)
    with pytest.raises(SettingError, match=f"asked for 8 devices but only {len(jax.devices())}"):
        mnet.influence(net, mnet.losses.softmax_cross_entropy, params, x, y, preconditioner="diag", devices=8)
    for bad in (-1, 2.0, True):
        with pytest.raises(SettingError, match="influence: devices must be None, 0"):
            mnet.influence(net, mnet.losses.softmax_cross_entropy, params, x, y, devices=bad)
    one = mnet.influence(net, mnet.losses.softmax_cross_entropy, params, x, y, preconditioner="diag", devices=1)
    base = mnet.influence(net, mnet.losses.softmax_cross_entropy, params, x, y, preconditioner="diag")
    assert one.mesh is None
    np.testing.assert_allclose(one.scores(x, y), base.scores(x, y), rtol=0, atol=0)
