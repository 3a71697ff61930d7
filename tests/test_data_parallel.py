"""Data-parallel training over forced host devices gives the single-device parameters (both gradient modes)."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, jax, jax.numpy as jnp, numpy as np, optax, mnet
    assert len(jax.devices()) == 4, jax.devices()
    full = mnet.data.load_digits(0)
    data = mnet.data.Dataset(full.x_train[:512], full.y_train[:512], full.x_test, full.y_test, 10, "digits")
    net = mnet.mlp([64, 10])
    _, params = net.init(jax.random.key(0), (64,))
    out = {}
    for grad in ("manual", "autodiff"):
        runs = [mnet.fit(net, mnet.losses.softmax_cross_entropy, params, data, optimizer=optax.sgd(0.05, momentum=0.9),
                         epochs=3, batch_size=64, grad=grad, devices=devices) for devices in (None, 4)]
        sharding = runs[1].params[0]["W"].sharding
        diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))),
                                       runs[1].params, runs[0].params)
        out[grad] = {"max_rel": max(jax.tree_util.tree_leaves(diffs)), "devices": len(sharding.device_set),
                     "loss": runs[1].history.train_loss, "loss_single": runs[0].history.train_loss}
    print(json.dumps(out))
""")


def test_four_devices_equal_one():
    env = dict(
        os.environ,
        XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
    )
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for grad in ("manual", "autodiff"):
        assert out[grad]["devices"] == 4  # the parameters really live on the 4-device mesh
        assert out[grad]["max_rel"] < 1e-5, out  # float32: only the order of the gradient sum differs
        assert abs(out[grad]["loss"][-1] / out[grad]["loss_single"][-1] - 1) < 1e-5


def test_cli_devices_errors_and_runs():
    env = dict(
        os.environ,
        XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
    )
    ok = subprocess.run(
        [sys.executable, "-m", "mnet", "train", "--devices", "2", "--epochs", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.splitlines()[-1])["test_accuracy"] > 0.5
    bad = subprocess.run(
        [sys.executable, "-m", "mnet", "train", "--devices", "8", "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert bad.returncode == 2 and "asked for 8 devices but only 2" in bad.stderr and "Traceback" not in bad.stderr
    odd = subprocess.run(
        [sys.executable, "-m", "mnet", "train", "--devices", "2", "--batch-size", "33", "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert odd.returncode == 2 and "divisible by the 2 devices" in odd.stderr
