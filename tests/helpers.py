"""Shared test machinery: random networks, tree comparisons, and the guard that forbids autodiff."""

from __future__ import annotations

import contextlib
import io
import math
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st
from jax._src.interpreters import ad

import mnet
from mnet.checking.agreement import Agreement, largest_entry, tolerance

ACTIVATIONS = [
    mnet.Relu(),
    mnet.Sigmoid(),
    mnet.Tanh(),
    mnet.LeakyRelu(0.1),
    mnet.Elu(),
    mnet.Elu(alpha=0.5),
    mnet.Gelu(),
    mnet.Gelu(approximate=True),
    mnet.Softplus(),
    mnet.Identity(),
    mnet.Softmax(),
]
LOSSES = [mnet.losses.mse, mnet.losses.softmax_cross_entropy, mnet.losses.sigmoid_binary_cross_entropy]


def random_targets(rng, loss, outputs_shape, dtype):
    """Targets that ``loss`` accepts for outputs of ``outputs_shape``."""
    if loss is mnet.losses.softmax_cross_entropy:
        return jnp.asarray(rng.integers(0, outputs_shape[1], outputs_shape[:1]))
    if loss is mnet.losses.sigmoid_binary_cross_entropy:
        return jnp.asarray(rng.uniform(size=outputs_shape), dtype)
    return jnp.asarray(rng.normal(size=outputs_shape), dtype)


def abstract_init(net, example_shape, dtype):
    """``(output_shape, params as ShapeDtypeStructs)`` of ``net.init`` without computing anything."""
    found = {}

    def init():
        found["shape"], params = net.init(jax.random.key(0), example_shape, dtype)
        return params

    params = jax.eval_shape(init)
    return found["shape"], params


def random_params(net, example_shape, dtype, rng):
    """Params of ``net`` with fresh values: weights N(0, 1/fan_in), every other leaf (biases) N(0, 0.1^2).

    The structure comes from ``jax.eval_shape`` and the values from NumPy, so no XLA computation is compiled
    per drawn shape; non-zero biases keep a wrong bias rule from hiding behind zeros."""
    _, shapes = abstract_init(net, example_shape, dtype)

    def draw(leaf):
        scale = 1 / np.sqrt(leaf.shape[0]) if leaf.ndim >= 2 else 0.1
        return jnp.asarray(scale * rng.normal(size=leaf.shape), dtype)

    return jax.tree_util.tree_map(draw, shapes)


# Sizes come from small pools: eager JAX compiles each primitive once per shape, so a bounded set of shapes
# keeps many random architectures affordable while depth, order, activations and values stay random.
WIDTHS = st.sampled_from([1, 3, 8])
BATCHES = st.sampled_from([1, 4])


@st.composite
def mlp_problems(draw, dtype=jnp.float64, losses=tuple(LOSSES)):
    """A random MLP (0 to 4 hidden layers, random widths and activations), its params, a batch and targets."""
    depth = draw(st.integers(0, 4))
    hidden = [(draw(WIDTHS), draw(st.sampled_from(ACTIVATIONS))) for _ in range(depth)]
    loss = draw(st.sampled_from(list(losses)))
    out_dim = draw(st.sampled_from([2, 5] if loss is mnet.losses.softmax_cross_entropy else [1, 2, 5]))
    in_dim, batch, seed = draw(WIDTHS), draw(BATCHES), draw(st.integers(0, 2**30))
    layers = [layer for width, activation in hidden for layer in (mnet.Dense(width), activation)]
    net = mnet.serial(*layers, mnet.Dense(out_dim))
    rng = np.random.default_rng(seed)
    params = random_params(net, (in_dim,), dtype, rng)
    x = jnp.asarray(rng.normal(size=(batch, in_dim)), dtype)
    targets = random_targets(rng, loss, (batch, out_dim), dtype)
    return net, loss, params, x, targets


def assert_trees_close(actual, expected, rtol=None, tree_scale=False):
    """Same structure, same dtypes, and every leaf within ``rtol`` relative to the reference leaf's largest entry
    (default: :func:`mnet.checking.agreement.tolerance` of the leaf's dtype). With ``tree_scale``, a leaf may instead be within
    ``rtol`` of the whole reference tree's largest entry: for leaves that are zero in exact arithmetic (see
    :attr:`mnet.checking.agreement.Agreement.ok`). ``float0`` leaves (no gradient for integer inputs) must match in shape."""
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    scale = largest_entry(expected) if tree_scale else 0.0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree_util.tree_leaves(expected)):
        if getattr(b, "dtype", None) == jax.dtypes.float0:
            assert a.dtype == b.dtype and a.shape == b.shape, f"{jax.tree_util.keystr(path)}: {a.dtype}{a.shape}"
            continue
        a, b = jnp.asarray(a), jnp.asarray(b)
        assert a.shape == b.shape, f"{jax.tree_util.keystr(path)}: shape {a.shape} != {b.shape}"
        assert a.dtype == b.dtype, f"{jax.tree_util.keystr(path)}: dtype {a.dtype} != {b.dtype}"
        limit = tolerance(b.dtype) if rtol is None else rtol
        agreement = Agreement.of(a, b, limit, scale)
        assert agreement.ok, (
            f"{jax.tree_util.keystr(path)}: relative error {agreement.max_rel_error:.3g} > {limit:.3g}"
            f" (absolute {agreement.max_abs_error:.3g}, tree scale {scale:.3g})"
        )


class AutodiffUsed(AssertionError):
    """Raised when JAX differentiation runs inside :func:`no_autodiff`."""


@contextlib.contextmanager
def no_autodiff():
    """Make JAX's differentiation machinery unusable: every primitive processed by a JVP or linearize trace
    raises, which is what ``jax.grad``, ``vjp``, ``jvp``, ``linearize``, ``jacrev``, ``jacfwd`` and ``hessian``
    all go through. Caches are cleared so that nothing compiled earlier hides a trace."""

    def refuse(*args, **kwargs):
        raise AutodiffUsed("JAX autodiff was used inside the hand-derived path")

    saved = {cls: cls.process_primitive for cls in (ad.JVPTrace, ad.LinearizeTrace)}
    jax.clear_caches()
    try:
        for cls in saved:
            cls.process_primitive = refuse
        yield
    finally:
        for cls, method in saved.items():
            cls.process_primitive = method
        jax.clear_caches()


def check_value_and_grad(net, loss, params, x, targets, rtol, tree_scale=False, **kwargs):
    """Hand-derived ``value_and_grad`` (jitted) against ``jax.value_and_grad``'s, then again with autodiff made
    unusable (the guard clears the compilation caches, so the hand path is traced afresh under it). ``kwargs``:
    ``key``/``train`` for networks with dropout."""
    hand = jax.jit(mnet.value_and_grad(net, loss), static_argnames="train")
    expected = jax.jit(mnet.autodiff_value_and_grad(net, loss), static_argnames="train")(params, x, targets, **kwargs)
    assert_trees_close(hand(params, x, targets, **kwargs), expected, rtol, tree_scale)
    with no_autodiff():
        guarded = hand(params, x, targets, **kwargs)
    assert_trees_close(guarded, expected, rtol, tree_scale)


# References for the derivatives beyond the gradient, shared by every test module that checks them.
def reference_per_example_grads(net, loss, params, x, targets):
    one = lambda p, xb, tb: loss.value(net.apply(p, xb[None]), tb[None])  # noqa: E731
    return jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, targets)


def reference_norms(grads, batch):
    return jnp.sqrt(sum(jnp.sum(leaf.reshape(batch, -1) ** 2, axis=1) for leaf in jax.tree_util.tree_leaves(grads)))


def reference_ntk(net, params, x1, x2):
    j1, j2 = jax.jacrev(net.apply)(params, x1), jax.jacrev(net.apply)(params, x2)
    k = net.apply(params, x1[:1]).shape[1]
    return sum(
        jnp.einsum("akp,ckp->ac", a.reshape(x1.shape[0], k, -1), b.reshape(x2.shape[0], k, -1))
        for a, b in zip(jax.tree_util.tree_leaves(j1), jax.tree_util.tree_leaves(j2))
    )


def check_all(problem, rtol, jit, tree_scale=False, x2=None):
    """Every derivative function against its autodiff reference. ``tree_scale`` for networks with leaves whose
    gradient is zero in exact arithmetic (attention's key bias); ``x2``: the NTK's second batch (default: the
    first one reversed and moved)."""
    net, loss, params, x, targets = problem
    wrap = jax.jit if jit else (lambda f, **kwargs: f)
    close = lambda actual, expected: assert_trees_close(actual, expected, rtol, tree_scale)  # noqa: E731
    expected = wrap(reference_per_example_grads, static_argnums=(0, 1))(net, loss, params, x, targets)
    close(wrap(mnet.per_example_grads(net, loss))(params, x, targets), expected)
    norms = reference_norms(expected, x.shape[0])
    close(wrap(mnet.per_example_grad_norms(net, loss))(params, x, targets), norms)
    clip = float(jnp.median(norms)) + 1e-3
    factors = jnp.minimum(1, clip / norms)
    clipped = jax.tree_util.tree_map(lambda g: jnp.tensordot(factors, g, 1) / x.shape[0], expected)
    value, grads = wrap(mnet.clipped_value_and_grad(net, loss, clip))(params, x, targets)
    close(grads, clipped)
    close(value, loss.value(net.apply(params, x), targets))
    close(wrap(mnet.jacobian(net))(params, x), wrap(jax.jacrev(net.apply))(params, x))
    x2 = x[::-1] * 0.5 + 0.1 if x2 is None else x2
    close(wrap(mnet.ntk(net))(params, x, x2), wrap(reference_ntk, static_argnums=0)(net, params, x, x2))


def load_experiment(name: str):
    """``experiments/<name>.py`` as a module, so a test can call its ``main([...])``."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_attention(layer, params, x, mask=None):
    """Attention written independently: per-head einsums and jax.nn.softmax restricted to the allowed keys."""
    batch, length, model = x.shape
    heads = layer.num_heads
    head_dim = layer.head_dim or model // heads

    def project(name):
        return (x @ params[name]["W"] + params[name]["b"]).reshape(batch, length, heads, head_dim)

    q, k, v = project("q"), project("k"), project("v")
    scores = jnp.einsum("bshd,bthd->bhst", q, k) / math.sqrt(head_dim)
    allowed = jnp.ones((batch, heads, length, length), bool)
    if layer.causal:
        allowed &= jnp.tril(jnp.ones((length, length), bool))
    if mask is not None:
        allowed &= mask
    weights = jnp.where(allowed, jax.nn.softmax(scores, axis=-1, where=allowed), 0.0)
    out = jnp.einsum("bhst,bthd->bshd", weights, v).reshape(batch, length, heads * head_dim)
    return out @ params["o"]["W"] + params["o"]["b"]


def run_mnet(*argv, cwd=None) -> subprocess.CompletedProcess:
    """``mnet ARGV`` in this process, its stdout and stderr captured, as a user's run has it (JAX's x64 off; the
    suite's fixture turns it back on): the command line's own code without a fresh interpreter and JAX import per
    call. The tests that must see the real entry point (the README's job) run a subprocess instead."""
    from mnet import cli  # the command line's modules, imported only by the tests that run it

    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    jax.config.update("jax_enable_x64", False)
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main([str(a) for a in argv])
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(list(argv), status, out.getvalue(), err.getvalue())
