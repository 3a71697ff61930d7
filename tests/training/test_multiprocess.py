"""Several processes as one training run (jax.distributed, gloo collectives on CPU), standing in for several hosts:
two processes of two forced CPU devices each against one process of four, and a run with a killed process that
stops within a bound and resumes from its checkpoint to the uninterrupted result."""

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
import safetensors.numpy

from mnet.training import distributed, launch, sharded_checkpoint

pytestmark = pytest.mark.skipif(
    "jax_cpu_collectives_implementation" not in jax.config.values,
    reason="this jax has no CPU collectives implementation (gloo), so CPU processes cannot share a computation",
)

BOUND = 60  # seconds for a failure to stop every process: JAX's heartbeat (10 s) and the launcher's grace (30 s)

SCRIPT = textwrap.dedent("""
    import sys
    import mnet
    mnet.distributed.initialize()
    import jax, numpy as np, optax
    full = mnet.data.load_digits(0)
    data = mnet.data.Dataset(full.x_train[:512], full.y_train[:512], full.x_test, full.y_test, 10, "digits")
    net = mnet.mlp([64, 32, 10])
    _, params = net.init(jax.random.key(0), (64,))
    leaves = {}
    for grad, layout in (("manual", "replicated"), ("autodiff", "replicated"), ("manual", "fsdp")):
        result = mnet.fit(net, mnet.losses.softmax_cross_entropy, params, data, optimizer=optax.adam(3e-3),
                          epochs=3, batch_size=64, devices=0, grad=grad, layout=layout)
        for index, leaf in enumerate(jax.tree_util.tree_leaves(mnet.sharding.to_host(result.params))):
            leaves[f"{grad}-{layout}-{index}"] = leaf
    if jax.process_index() == 0:
        np.savez(sys.argv[1], processes=jax.process_count(), devices=jax.device_count(), **leaves)
""")


def four_devices_env() -> dict:
    return dict(
        os.environ,
        XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
    )


def run_group(count: int, argv: list[str], log, *, devices: int = 2, kill_when=None) -> tuple[int, list, float]:
    """Start ``count`` processes of ``argv`` and supervise them; ``kill_when()`` true kills process 1 (SIGKILL).
    Returns the launcher's status, the processes, and the seconds from the kill to the end."""
    processes = launch.start(count, argv, local_devices=devices, stdout=log, stderr=subprocess.STDOUT)
    killed_at = None
    try:
        if kill_when is not None:
            began = time.monotonic()
            while not kill_when():
                assert time.monotonic() - began < 240, "the run never reached the point of the kill"
                assert all(p.poll() is None for p in processes), "a process ended before the kill"
                time.sleep(0.05)
            processes[1].send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
        said = []
        status = launch.supervise(processes, grace_seconds=30, timeout_seconds=240, say=said.append)
        log.write("\n".join(said))
    finally:
        launch.stop(processes)  # whatever failed above, leave nothing running
    return status, processes, (0.0 if killed_at is None else time.monotonic() - killed_at)


def relative_gaps(a, b) -> dict:
    return {name: float(np.max(np.abs(a[name] - b[name])) / np.max(np.abs(b[name]))) for name in b.files if "-" in name}


def test_two_processes_equal_one_process_of_four_devices(tmp_path):
    """Replicated with hand-derived and autodiff gradients, and fully sharded (each process holds half of every
    weight): the parameters after 3 epochs equal one process with four devices to float32 rounding."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    with open(tmp_path / "group.log", "w") as log:
        status, processes, _ = run_group(2, [sys.executable, str(script), str(tmp_path / "two.npz")], log)
    assert status == 0, (tmp_path / "group.log").read_text()[-3000:]
    alone = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one.npz")],
        capture_output=True,
        text=True,
        timeout=300,
        env=four_devices_env(),
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert (int(two["processes"]), int(two["devices"])) == (2, 4)
    assert (int(one["processes"]), int(one["devices"])) == (1, 4)
    gaps = relative_gaps(two, one)
    assert len(gaps) == 18 and max(gaps.values()) < 1e-5, gaps
    assert all(p.returncode == 0 for p in processes)


def test_a_killed_process_stops_the_run_and_resume_matches(tmp_path):
    """mnet train as two processes with a checkpoint; process 1 is killed after the first checkpoint. The survivor
    is stopped (non-zero) within the bound, nothing is left running, and relaunching with --resume ends where an
    uninterrupted single-process run of four devices ends."""
    checkpoint, params = tmp_path / "run.npz", tmp_path / "params.npz"
    run = ["train", "--epochs", "4", "--batch-size", "64"]
    argv = run + ["--devices", "0", "--checkpoint", str(checkpoint)]
    with open(tmp_path / "killed.log", "w") as log:
        status, processes, stopped_in = run_group(2, argv, log, kill_when=checkpoint.exists)
    said = (tmp_path / "killed.log").read_text()
    assert status == 128 + signal.SIGKILL, said[-3000:]
    assert "mnet launch: process 1 of 2 was killed by SIGKILL" in said
    assert processes[0].returncode != 0 and stopped_in < BOUND, (processes[0].returncode, stopped_in)
    assert all(p.poll() is not None for p in processes)

    with open(tmp_path / "resumed.log", "w") as log:
        status, _, _ = run_group(2, argv + ["--resume", "--save-params", str(params)], log)
    assert status == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    reference = tmp_path / "reference.npz"
    alone = subprocess.run(
        [sys.executable, "-m", "mnet", *run, "--devices", "4", "--save-params", str(reference)],
        capture_output=True,
        text=True,
        timeout=300,
        env=four_devices_env(),
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    resumed, uninterrupted = (safetensors.numpy.load_file(path) for path in (params, reference))
    assert sorted(uninterrupted) == sorted(resumed) == ["0.W", "0.b", "2.W", "2.b"]
    for name, b in uninterrupted.items():
        gap = np.max(np.abs(resumed[name] - b)) / np.max(np.abs(b))
        assert gap < 1e-5, (name, gap)


SHARDED = textwrap.dedent("""
    import sys
    import mnet
    mnet.distributed.initialize()
    import jax, numpy as np, optax
    full = mnet.data.load_digits(0)
    data = mnet.data.Dataset(full.x_train[:256], full.y_train[:256], full.x_test, full.y_test, 10, "digits")
    net = mnet.mlp([64, 32, 10])
    _, params = net.init(jax.random.key(0), (64,))
    result = mnet.fit(net, mnet.losses.softmax_cross_entropy, params, data, optimizer=optax.adam(3e-3), epochs=2,
                      batch_size=64, devices=0, layout="fsdp", checkpoint_path=sys.argv[1])
    whole = mnet.sharding.to_host((result.params, result.opt_state))
    if jax.process_index() == 0:
        leaves = jax.tree_util.tree_leaves(whole)
        np.savez(sys.argv[2], *leaves, sharded=jax.tree_util.tree_leaves(result.params)[0].sharding.spec != ())
""")


@pytest.mark.skipif(
    importlib.util.find_spec("orbax") is None, reason="needs orbax-checkpoint (pip install mnet[orbax])"
)
def test_two_processes_write_their_shards_and_one_process_of_one_device_resumes(tmp_path):
    """fit with a sharded checkpoint (run.orbax) in two processes of two devices, the parameters and the optimizer
    state sharded over all four (layout fsdp): each process writes its own shards; this process, one device,
    reads the checkpoint whole to the same bits and resumes from it."""
    import optax

    import mnet

    script, path = tmp_path / "train.py", tmp_path / "run.orbax"
    script.write_text(SHARDED)
    with open(tmp_path / "group.log", "w") as log:
        status, _, _ = run_group(2, [sys.executable, str(script), str(path), str(tmp_path / "whole.npz")], log)
    assert status == 0, (tmp_path / "group.log").read_text()[-3000:]
    (step,) = [entry for entry in path.iterdir() if entry.name.isdigit()]
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= {e.name for e in (step / "state").iterdir()}

    full = mnet.data.load_digits(0)
    data = mnet.data.Dataset(full.x_train[:256], full.y_train[:256], full.x_test, full.y_test, 10, "digits")
    net = mnet.mlp([64, 32, 10])
    _, params = net.init(jax.random.key(0), (64,), np.float32)
    optimizer = optax.adam(3e-3)
    like = jax.tree_util.tree_map(np.asarray, (params, optimizer.init(params)))
    restored, meta = sharded_checkpoint.read_sharded(path, like)
    whole = np.load(tmp_path / "whole.npz")
    assert bool(whole["sharded"]) and meta["epoch"] == 2
    for index, leaf in enumerate(jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(leaf, whole[f"arr_{index}"])
    loss = mnet.losses.softmax_cross_entropy
    resumed = mnet.fit(
        net, loss, params, data, optimizer=optimizer, epochs=3, batch_size=64, checkpoint_path=path, resume=True
    )
    assert resumed.history.epoch == [1, 2, 3]


def test_launch_refuses_bad_input():
    bad = subprocess.run(
        [sys.executable, "-m", "mnet", "launch", "-n", "2", "--"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "nothing to run" in bad.stderr and "Traceback" not in bad.stderr
    import mnet

    net = mnet.mlp([4, 2])
    _, params = net.init(jax.random.key(0), (3,))
    data = mnet.data.Dataset(np.ones((8, 3)), np.zeros(8, int), np.ones((2, 3)), np.zeros(2, int), 2, "ones")
    for options, message in (({"layout": "rows"}, "layout must be one of"), ({"layout": "fsdp"}, "pass devices=")):
        with pytest.raises(ValueError, match=message):
            mnet.fit(net, mnet.losses.softmax_cross_entropy, params, data, epochs=1, batch_size=4, **options)
    with pytest.raises(ValueError, match="all three"):
        distributed.settings(coordinator="127.0.0.1:1234")
    with pytest.raises(ValueError, match="not in"):
        distributed.settings("127.0.0.1:1234", 2, 2)


def test_supervise_stops_the_rest_after_a_failure_and_at_the_timeout():
    """Plain processes (no JAX): one fails, the other would sleep for a minute; the launcher reports the failure,
    kills the sleeper after its grace and reaps both. A group that runs too long is stopped whole."""
    code = "import os, sys, time; sys.exit(3) if os.environ['MNET_PROCESS_ID'] == '1' else time.sleep(60)"
    began, said = time.monotonic(), []
    processes = launch.start(2, [sys.executable, "-c", code])
    assert launch.supervise(processes, grace_seconds=1, say=said.append) == 3
    assert time.monotonic() - began < 20 and all(p.poll() is not None for p in processes)
    assert said == [
        "mnet launch: process 1 of 2 exited with status 3; stopping the others (a run with a checkpoint resumes "
        "from its last good epoch with --resume)"
    ]
    processes = launch.start(1, [sys.executable, "-c", "import time; time.sleep(60)"])
    assert launch.supervise(processes, timeout_seconds=1, say=said.append) == 124
    assert processes[0].poll() is not None and "ran past 1 s" in said[-1]


def test_the_launcher_passes_every_line_on_but_the_collective_librarys_start_up_noise():
    import io

    source = io.StringIO(
        "[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n"
        "epoch 1/1  train loss 2.1\n"
        "[Gloo] a line gloo means a user to read\n"
    )
    target = io.StringIO()
    launch.forward_lines(source, target).join(timeout=5)
    assert target.getvalue() == "epoch 1/1  train loss 2.1\n[Gloo] a line gloo means a user to read\n"
