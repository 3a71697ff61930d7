"""Training on 4 forced host devices, parameters replicated, fully sharded or tensor-parallel, gives the single-device
parameters (both gradient modes), and the compiled step holds only the shards."""

import json
import os
import subprocess
import sys
import textwrap


def test_cli_devices_errors(capsys):
    """More devices than there are is one line and exit 2 (mnet train --devices 0 itself runs in
    test_multiprocess.py; a batch that does not split over the devices is refused in the layouts test below)."""
    from mnet.cli import main

    assert main(["train", "--devices", "8", "--epochs", "1"]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "mnet train: error: asked for 8 devices but only 1" in said[0], said


LAYOUTS_SCRIPT = textwrap.dedent("""
    import json, jax, jax.numpy as jnp, numpy as np, optax, mnet
    from mnet import train
    assert len(jax.devices()) == 4, jax.devices()
    full = mnet.data.load_digits(0)
    data = mnet.data.Dataset(full.x_train[:512], full.y_train[:512], full.x_test, full.y_test, 10, "digits")
    net = mnet.serial(mnet.Dense(64), mnet.Tanh(), mnet.Dense(32), mnet.Relu(), mnet.Dense(10))
    _, params = net.init(jax.random.key(0), (64,))
    loss, out = mnet.losses.softmax_cross_entropy, {}
    layouts = {"replicated": {}, "autodiff": {"grad": "autodiff"}, "fsdp": {"layout": "fsdp"},
               "tensor": {"layout": "tensor", "model_devices": 2}, "tensor4": {"layout": "tensor"}}
    runs = {name: train.fit(net, loss, params, data, optimizer=optax.adam(3e-3), epochs=3, batch_size=64, devices=4,
                            **options) for name, options in layouts.items()}
    single = train.fit(net, loss, params, data, optimizer=optax.adam(3e-3), epochs=3, batch_size=64)
    for name, run in runs.items():
        gaps = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))),
                                      run.params, single.params)
        specs = [list(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(run.params)]
        out[name] = {"max_rel": max(jax.tree_util.tree_leaves(gaps)), "specs": specs}
    wide = mnet.mlp([256, 1024, 1024, 10])
    _, wide_params = wide.init(jax.random.key(0), (256,))
    for name, (layout, model) in {"replicated": ("replicated", 1), "fsdp": ("fsdp", 1), "tensor4": ("tensor", 4)}.items():
        out[name]["memory"] = train.layout_memory(wide, loss, optax.adam(1e-3), wide_params, np.zeros(256, np.float32),
                                                  64, devices=4, layout=layout, model_devices=model)
    out["parameter_bytes"] = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(wide_params))
    # padded sequences: each batch's mask rows travel with its labels, over the mesh too
    V, T = 7, 5
    attention = mnet.MultiHeadSelfAttention(2, num_kv_heads=1, rope_base=50.0, use_bias=False)
    encoder = mnet.serial(mnet.Embedding(V, 8), mnet.residual(mnet.serial(mnet.RMSNorm(), attention)), mnet.Dense(V))
    _, encoder_params = encoder.init(jax.random.key(0), (T,))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (16, T))
    masks = np.arange(T)[None] < rng.integers(1, T + 1, 16)[:, None]
    padded = mnet.data.Dataset(ids[:12], np.roll(ids, -1, 1)[:12], ids[12:], np.roll(ids, -1, 1)[12:], V, "padded",
                               mask_train=masks[:12], mask_test=masks[12:])
    fits = [train.fit(encoder, loss, encoder_params, padded, optimizer=optax.sgd(0.1), epochs=2, batch_size=4,
                      **options).params for options in ({}, {"devices": 4})]
    out["masked_max_rel"] = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                                for a, b in zip(*map(jax.tree_util.tree_leaves, fits)))
    try:
        train.fit(net, loss, params, data, epochs=1, batch_size=66, devices=4)
    except ValueError as error:
        out["odd_batch"] = str(error)
    print(json.dumps(out))
""")


def test_sharded_layouts_equal_replicated_and_hold_a_quarter():
    """FSDP and tensor-parallel training (2x2 and 1x4 meshes) end where single-device training ends (float32), the
    parameters really are split as documented, and the compiled step's per-device argument bytes (XLA's memory
    analysis) are the shards: parameter and Adam-state bytes per device fall by the 4 devices."""
    env = dict(
        os.environ,
        XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
    )
    result = subprocess.run(
        [sys.executable, "-c", LAYOUTS_SCRIPT], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("replicated", "autodiff", "fsdp", "tensor", "tensor4"):  # float32: only the sums' order differs
        assert out[name]["max_rel"] < 1e-5, (name, out[name])
    assert out["replicated"]["specs"] == [[]] * 6
    # Dense(64) W (64, 64) and b (64,), Dense(32) W (64, 32), b (32,), Dense(10) W (32, 10), b (10,).
    assert out["fsdp"]["specs"] == [["data"]] * 5 + [[]]
    column, row = [None, "model"], ["model", None]
    assert out["tensor"]["specs"] == [column, ["model"], row, [], [], []]
    assert out["odd_batch"] == "batch_size 66 must be divisible by the 4 devices"
    assert out["masked_max_rel"] < 1e-5
    total = out["parameter_bytes"]
    replicated, fsdp, tensor = (out[name]["memory"] for name in ("replicated", "fsdp", "tensor4"))
    assert replicated["parameters"] == total and replicated["optimizer_state"] >= 2 * total
    for memory in (replicated, fsdp, tensor):  # the compiled program's inputs are exactly these shards (+ the key)
        held = memory["parameters"] + memory["optimizer_state"] + memory["batch"]
        assert 0 <= memory["argument_bytes"] - held <= 16, memory
    for memory in (fsdp, tensor):
        assert (
            memory["parameters"] <= total / 4 + 4096
            and memory["optimizer_state"] <= replicated["optimizer_state"] / 4 + 8192
        )
        assert memory["argument_bytes"] <= 0.26 * replicated["argument_bytes"]
