"""The bad-input sweep (issue 29): every public function and every subcommand given wrong shapes, dtypes and ranks,
NaN and inf, empty arrays, a class instead of an instance, out-of-range ids and labels, garbage, truncated and
mismatched files, and bad numbers. Each must answer with an `MnetError` subclass (Python) or one line and a non-zero
exit status (the command line), never a raw exception. Everything is traced, not run, where it can be."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mnet
from mnet import cli

CE = mnet.losses.softmax_cross_entropy
KEY = jax.random.key(0)
NET = mnet.serial(mnet.Dense(4), mnet.Relu(), mnet.Dense(3))
PARAMS = NET.init(KEY, (5,))[1]
X, Y = jnp.ones((2, 5)), jnp.array([0, 1])
EMBEDDED = mnet.serial(mnet.Embedding(7, 4), mnet.LastStep(), mnet.Dense(3))
EMBEDDED_PARAMS = EMBEDDED.init(KEY, (3,))[1]
MLP = mnet.mlp([10])
MLP_PARAMS = MLP.init(KEY, (64,))[1]


def digits():
    return mnet.data.load_digits(0)


def traced(function, *args, **kwargs):
    """Trace a jitted computation (its shape checks run at trace time) without compiling it."""
    return jax.make_jaxpr(lambda *a: function(*a, **kwargs))(*args)


def garbage(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


CASES = {
    # a class instead of an instance, and objects that are no layers
    "serial of a class": lambda t: mnet.serial(mnet.Dense),
    "value_and_grad of a class": lambda t: traced(mnet.value_and_grad(mnet.Dense, CE), PARAMS, X, Y),
    "check_layer of a class": lambda t: mnet.check_layer(mnet.Dense, (3,)),
    "describe a tuple": lambda t: mnet.layers.architecture.describe_network((1, 2)),
    # bad layer settings
    "Dense(0)": lambda t: mnet.Dense(0).init(KEY, (3,)),
    "Dense(-2)": lambda t: mnet.Dense(-2).init(KEY, (3,)),
    "Dense('a')": lambda t: mnet.Dense("a").init(KEY, (3,)),
    "Conv2D on a vector": lambda t: mnet.Conv2D(2, 3).init(KEY, (5,)),
    "MaxPool2D(0)": lambda t: mnet.MaxPool2D(0).init(KEY, (4, 4, 1)),
    "heads that do not divide": lambda t: mnet.MultiHeadSelfAttention(3).init(KEY, (4, 8)),
    "kv heads that do not divide": lambda t: mnet.MultiHeadSelfAttention(4, num_kv_heads=3).init(KEY, (4, 8)),
    "rotary with an odd head": lambda t: mnet.MultiHeadSelfAttention(2, head_dim=3, rope_base=10.0).init(KEY, (4, 8)),
    "Dropout(1.5)": lambda t: mnet.Dropout(1.5).init(KEY, (3,)),
    "LayerNorm(eps=-1)": lambda t: mnet.LayerNorm(eps=-1.0),
    "RMSNorm(eps=nan)": lambda t: mnet.RMSNorm(eps=float("nan")),
    "BatchNorm(momentum=2)": lambda t: mnet.BatchNorm(momentum=2.0),
    "a residual that changes the shape": lambda t: mnet.residual(mnet.Dense(3)).init(KEY, (4,)),
    "parallel sum of unequal shapes": lambda t: mnet.parallel(mnet.Dense(3), mnet.Flatten()).init(KEY, (2, 4)),
    "gpt with heads that do not divide": lambda t: mnet.models.gpt(10, 8, 30, 1, 4),
    "mlp of no widths": lambda t: mnet.mlp([]),
    # wrong shapes, ranks, dtypes; empty arrays; another network's params
    "wrong input width": lambda t: traced(mnet.value_and_grad(NET, CE), PARAMS, jnp.ones((2, 6)), Y),
    "rank-1 input": lambda t: traced(mnet.value_and_grad(NET, CE), PARAMS, jnp.ones((5,)), Y),
    "targets of another batch": lambda t: traced(mnet.value_and_grad(NET, CE), PARAMS, X, jnp.array([0, 1, 2])),
    "float labels": lambda t: traced(mnet.value_and_grad(NET, CE), PARAMS, X, jnp.ones((2,))),
    "float ids for an embedding": lambda t: traced(mnet.value_and_grad(EMBEDDED, CE), EMBEDDED_PARAMS, X[:, :3], Y),
    "ids out of range": lambda t: EMBEDDED.forward(EMBEDDED_PARAMS, jnp.array([[0, 9, 1], [1, 2, 3]])),
    "labels out of range": lambda t: CE.check_targets((2, 3), np.array([0, 5]), "labels"),
    "another network's params": lambda t: traced(mnet.value_and_grad(NET, CE), EMBEDDED_PARAMS, X, Y),
    "an empty batch": lambda t: traced(mnet.value_and_grad(NET, CE), PARAMS, X[:0], Y[:0]),
    "an empty batch of norms": lambda t: traced(mnet.per_example_grad_norms(NET, CE), PARAMS, X[:0], Y[:0]),
    "a mask of another length": lambda t: traced(
        mnet.value_and_grad(EMBEDDED, CE), EMBEDDED_PARAMS, jnp.zeros((2, 3), int), Y, mask=jnp.ones((2, 4), bool)
    ),
    "an ntk of unequal inputs": lambda t: traced(mnet.ntk(NET), PARAMS, X, jnp.ones((2, 6))),
    "a tangent of another structure": lambda t: traced(mnet.jvp(NET), PARAMS, X, EMBEDDED_PARAMS),
    "check_layer at a wrong shape": lambda t: mnet.check_layer(mnet.Conv2D(2, 3), (3,)),
    # NaN and inf
    "NaN features in fit": lambda t: mnet.fit(MLP, CE, MLP_PARAMS, nan_digits(), epochs=1),
    "inf clip norm": lambda t: mnet.clipped_value_and_grad(NET, CE, float("inf")),
    "NaN learning rate for kfac": lambda t: mnet.kfac(NET, CE, (5,), learning_rate=float("nan")),
    # bad numbers and names
    "fit batch_size 0": lambda t: mnet.fit(NET, CE, PARAMS, digits(), batch_size=0),
    "fit epochs -1": lambda t: mnet.fit(MLP, CE, MLP_PARAMS, digits(), epochs=-1),
    "fit epochs 2.5": lambda t: mnet.fit(MLP, CE, MLP_PARAMS, digits(), epochs=2.5),
    "fit with another network's params": lambda t: mnet.fit(NET, CE, PARAMS, digits(), epochs=1),
    "fit sampling 'x'": lambda t: mnet.fit(MLP, CE, MLP_PARAMS, digits(), epochs=1, sampling="x"),
    "fit layout without devices": lambda t: mnet.fit(MLP, CE, MLP_PARAMS, digits(), epochs=1, layout="fsdp"),
    "kfac damping -1": lambda t: mnet.kfac(NET, CE, (5,), damping=-1.0),
    "kfac of no params": lambda t: mnet.kfac(mnet.serial(mnet.Relu()), CE, (5,)).init(()),
    "kfac_factors kind 'x'": lambda t: mnet.kfac_factors(NET, CE, kind="x"),
    "diag_ggn mc_samples 0": lambda t: mnet.diag_ggn(NET, CE, mc_samples=0),
    "diag_ggn mc_samples -1": lambda t: mnet.diag_ggn(NET, CE, mc_samples=-1),
    "diag_hessian hutchinson 0": lambda t: mnet.diag_hessian(NET, CE, hutchinson_samples=0),
    "laplace structure 'full'": lambda t: mnet.laplace(NET, CE, PARAMS, X, Y, structure="full"),
    "laplace prior -1": lambda t: mnet.laplace(NET, CE, PARAMS, X, Y, prior_precision=-1.0),
    "dp_noise clip -1": lambda t: mnet.dp_noise(-1.0, 1.0, 8, KEY),
    "dp_noise batch 0": lambda t: mnet.dp_noise(1.0, 1.0, 0, KEY),
    "dp_epsilon of a string": lambda t: mnet.dp_epsilon("1", 0.1, 10, 1e-5),
    "an unknown loss": lambda t: mnet.losses.get("hinge"),
    # files: missing, garbage, truncated, mismatched, unsaveable
    "load_params of a missing file": lambda t: mnet.load_params(str(t / "none.npz"), PARAMS),
    "load_params of garbage": lambda t: mnet.load_params(garbage(t, "g.npz", b"PK\x03\x04garbage"), PARAMS),
    "load_params of a truncated file": lambda t: mnet.load_params(truncated(t), PARAMS),
    "load_params of another network": lambda t: mnet.load_params(saved(t), EMBEDDED_PARAMS),
    "save_params of an object": lambda t: mnet.save_params(str(t / "o.npz"), {"a": object()}),
    "a dataset that is missing": lambda t: mnet.data.load(str(t / "none.npz")),
    "a CSV with text in it": lambda t: mnet.data.load(garbage(t, "g.csv", b"a,b\n1,x\n")),
    "an npz without y": lambda t: mnet.data.load(npz(t, x=np.ones((4, 2)))),
    "an npz of pickled objects": lambda t: mnet.data.load(npz(t, x=np.array([{}], object), y=np.zeros(1))),
    "labels that are not integers": lambda t: mnet.data.load(npz(t, x=np.ones((4, 2)), y=np.array([0, 1.5, 1, 0]))),
    "a training checkpoint of garbage": lambda t: mnet.training.trained.load_trained(garbage(t, "c.npz", b"x")),
    "a checkpoint without a description": lambda t: mnet.training.trained.load_trained(saved(t)),
}


def nan_digits():
    data = digits()
    x = data.x_train.copy()
    x[0, 0] = np.inf
    return mnet.data.Dataset(x, data.y_train, data.x_test, data.y_test, 10, "inf")


def saved(tmp_path):
    path = str(tmp_path / "p.npz")
    mnet.save_params(path, PARAMS)
    return path


def truncated(tmp_path):
    path = tmp_path / "t.npz"
    mnet.save_params(path, PARAMS)
    path.write_bytes(path.read_bytes()[:-40])
    return str(path)


def npz(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("name", CASES)
def test_every_public_function_answers_bad_input_with_an_mnet_error(name, tmp_path):
    with pytest.raises(mnet.MnetError) as raised:
        CASES[name](tmp_path)
    message = str(raised.value)
    assert message and "\n" not in message.strip() or "Traceback" not in message


@pytest.mark.parametrize(
    "argv",
    [
        ["check", "--layers", "x"],
        ["check", "--net", "os:path"],
        ["check", "--net", "no_such_module:net", "--input-shape", "3"],
        ["check", "--dtype", "bfloat16"],
        ["check", "--batch", "-1"],
        ["check", "--input-shape", "0"],
        ["train", "--data", "/nonexistent/file.npz"],
        ["train", "--epochs", "0"],
        ["train", "--lr", "nan"],
        ["train", "--lr", "inf"],
        ["train", "--batch-size", "100000"],
        ["train", "--model", "mlp", "--layers", "3,-1"],
        ["train", "--weight-decay", "-1"],
        ["train", "--model", "gpt", "--context", "0"],
        ["eval", "--checkpoint", "/nonexistent.npz"],
        ["eval"],
        ["predict", "--checkpoint", "/nonexistent.npz", "--input", "x.npy", "--output", "y.npz"],
        ["bench", "--rows", "Z9"],
        ["launch", "-n", "0", "--", "train"],
        ["launch", "-n", "2"],
        ["no-such-command"],
        [],
    ],
)
def test_every_subcommand_answers_bad_input_with_one_line(argv, capsys):
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert status not in (0, None) and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("mnet") and "error" in err


BAD_NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not (v > 0 and math.isfinite(v))),
    st.integers(max_value=0),
    st.text(max_size=3),
    st.none(),
)


@settings(max_examples=30, deadline=None)
@given(value=BAD_NUMBERS, where=st.sampled_from(["clip", "noise", "damping", "decay", "rate", "steps", "delta"]))
def test_bad_numbers_anywhere_are_setting_errors(value, where):
    if where == "noise" and value == 0:
        return  # zero noise is allowed (no privacy, reported as epsilon = inf)
    calls = {
        "clip": lambda: mnet.dp_noise(value, 1.0, 8, KEY),
        "noise": lambda: mnet.dp_noise(1.0, value if value != 0 else -1, 8, KEY),
        "damping": lambda: mnet.kfac(NET, CE, (5,), damping=value),
        "decay": lambda: mnet.kfac(NET, CE, (5,), decay=value if value != 0 else -1),
        "rate": lambda: mnet.dp_epsilon(1.0, value, 10, 1e-5),
        "steps": lambda: mnet.dp_epsilon(1.0, 0.1, value if value != 0 else -1, 1e-5),
        "delta": lambda: mnet.dp_epsilon(1.0, 0.1, 10, value),
    }
    with pytest.raises(mnet.MnetError):
        calls[where]()


def test_the_sweep_counts_its_cases():
    assert len(CASES) >= 60
