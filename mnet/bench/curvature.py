"""Benchmark rows for curvature (``mnet bench`` rows G1 to G4): every quantity as a multiple of one hand-derived
gradient (``mnet.value_and_grad``) measured in the same run, interleaved with autodiff's ways to the same number.
Like :mod:`mnet.bench`, this module calls JAX's autodiff: it is a contender."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mnet.bench.problems import cnn_problem, mlp_problem, transformer_problem
from mnet.bench.timing import Row, interleaved_medians
from mnet.core.protocol import apply_layer
from mnet.losses import softmax_cross_entropy
from mnet.models import mlp
from mnet.optim.kfac import kfac
from mnet.quantities.diag_hessian import diag_hessian
from mnet.quantities.ggn import diag_ggn, ggn_vector_product, per_example_diag_ggn
from mnet.quantities.gradient import value_and_grad
from mnet.quantities.hessian_vector import hessian_vector_product
from mnet.quantities.kronecker import kfac_factors
from mnet.quantities.tangent import jvp
from mnet.training.steps import make_step

LOSS = softmax_cross_entropy
TIMES = "time as a multiple of a hand-derived gradient: 1 / speed-up"


def per_example_vjp_diag_ggn(net: Any):
    """Autodiff's exact GGN diagonal: per example, ``jax.vjp`` of every column of the loss Hessian's square root,
    the parameter gradients squared and summed."""

    def by_vjp(params, x, labels):
        S = LOSS.hessian_sqrt(apply_layer(net, params, x), labels)

        def one(x_b, S_b):
            _, vjp = jax.vjp(lambda q: apply_layer(net, q, x_b[None])[0], params)
            columns = jax.vmap(lambda column: vjp(column)[0])(S_b)
            return jax.tree_util.tree_map(lambda g: jnp.sum(g * g, axis=0), columns)

        return jax.tree_util.tree_map(lambda d: d.mean(0), jax.vmap(one)(x, jnp.moveaxis(S, 0, 1)))

    return jax.jit(by_vjp)


def sampled_label_grads(net: Any):
    """Autodiff's one-sample Monte-Carlo GGN diagonal: labels drawn from the model's own softmax, each example's
    gradient by ``vmap(jax.grad)``, squared and averaged."""

    def estimate(params, x, labels, *, key):
        logits = apply_layer(net, params, x)
        sampled = jax.random.categorical(key, jax.lax.stop_gradient(logits))

        def loss_b(p, x_b, y_b):
            return LOSS.value(apply_layer(net, p, x_b[None]), y_b[None])

        grads = jax.vmap(jax.grad(loss_b), in_axes=(None, 0, 0))(params, x, sampled)
        return jax.tree_util.tree_map(lambda g: jnp.mean(g * g, axis=0), grads)

    return estimate


#: The seed of every sampled quantity's key (made when a row runs: no JAX computation at import, which would start
#: the backend before ``jax.distributed.initialize`` can run).
SEED = 0


def _timed(net, params, x, y, contenders: dict[str, Any], rounds: int) -> dict[str, float]:
    """The contenders' medians with the hand gradient first, as the baseline."""
    return _medians({"gradient (hand)": jax.jit(value_and_grad(net, LOSS)), **contenders}, params, x, y, rounds)


def _medians(contenders: dict[str, Any], params, x, y, rounds: int) -> dict[str, float]:
    """Each contender called on ``(params, x, y)``, timed in interleaved rounds."""
    return interleaved_medians({name: functools.partial(fn, params, x, y) for name, fn in contenders.items()}, rounds)


def _with_key(fn):
    """``fn(params, x, y, *, key)`` jitted, called with a fixed key."""
    return functools.partial(jax.jit(lambda p, x, y, key: fn(p, x, y, key=key)), key=jax.random.key(SEED))


def kfac_jax_status() -> str:
    """Whether DeepMind's kfac-jax, the optional contender, can be imported here (its registry release 0.0.8
    cannot on the jax mnet installs); recorded in the row so a reader knows why it has no kfac-jax figure."""
    try:
        import kfac_jax  # noqa: F401  (optional: a contender where installed)
    except Exception as error:  # absent, or broken against this jax
        return f"skipped: kfac_jax cannot be imported ({type(error).__name__})"
    return "importable; no kfac-jax contender is wired in yet"


def row_mlp_curvature(widths: list[int], batch: int, rounds: int, name: str) -> Row:
    """Every GGN quantity on an MLP (ReLU, softmax cross-entropy), with autodiff's way to the sampled diagonal;
    autodiff's exact one is the row G1v (:func:`row_autodiff_diag_ggn`)."""
    net, params, x, y = mlp_problem(widths, batch)
    contenders: dict[str, Any] = {
        "diag GGN exact": jax.jit(diag_ggn(net, LOSS)),
        "diag GGN MC(1)": _with_key(diag_ggn(net, LOSS, mc_samples=1)),
        "per-example diag GGN": jax.jit(per_example_diag_ggn(net, LOSS)),
        "kflr factors": jax.jit(kfac_factors(net, LOSS)),
        "kfac factors": _with_key(kfac_factors(net, LOSS, kind="kfac")),
        "vmap(grad) sampled labels": _with_key(sampled_label_grads(net)),
    }
    return Row(
        name,
        f"GGN quantities, MLP {'-'.join(map(str, widths))} (ReLU), batch {batch}, softmax cross-entropy ({TIMES})",
        _timed(net, params, x, y, contenders, rounds),
        "gradient (hand)",
        {"kfac-jax": kfac_jax_status()},
    )


def row_autodiff_diag_ggn(widths: list[int], batch: int, rounds: int) -> Row:
    """Autodiff's exact GGN diagonal (a ``jax.vjp`` per example and output, about a thousand gradients) beside
    mnet's, in a row of its own: interleaved with G1's contenders, its 2 GB of temporaries left the next calls
    slow for longer than any warm-up (G1's gradient read 5.7 ms instead of 3.3, and cheap quantities looked
    cheaper than a gradient)."""
    net, params, x, y = mlp_problem(widths, batch)
    contenders = {
        "diag GGN exact": jax.jit(diag_ggn(net, LOSS)),
        "per-example vjp per output": per_example_vjp_diag_ggn(net),
    }
    description = f"autodiff's exact GGN diagonal, MLP {'-'.join(map(str, widths))} (ReLU), batch {batch} ({TIMES})"
    return Row("G1v", description, _timed(net, params, x, y, contenders, rounds), "gradient (hand)")


def row_diag_hessian(widths: list[int], batch: int, rounds: int) -> Row:
    """The exact Hessian diagonal of a tanh MLP. Autodiff has no exact diagonal short of one Hessian-vector
    product per parameter; the contender is one such product (``jax.jvp`` of ``jax.grad``, forward over reverse,
    the cheapest), which is also the cost of one Hutchinson probe ``v * Hv`` of the diagonal's estimate."""
    net = mlp(widths[1:], activation="tanh")
    _, params = net.init(jax.random.key(0), (widths[0],), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (batch, widths[0]), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (batch,), 0, widths[-1])

    def hvp(p, inputs, labels):
        tangent = jax.tree_util.tree_map(jnp.ones_like, p)
        return jax.jvp(jax.grad(lambda q: LOSS.value(apply_layer(net, q, inputs), labels)), (p,), (tangent,))[1]

    contenders = {
        "diag Hessian (hand)": jax.jit(diag_hessian(net, LOSS)),
        "diag GGN exact": jax.jit(diag_ggn(net, LOSS)),
        "one HVP (jvp of grad)": jax.jit(hvp),
    }
    parameters = sum(a * b + b for a, b in zip(widths, widths[1:]))
    return Row(
        "G2",
        f"exact Hessian diagonal, MLP {'-'.join(map(str, widths))} (tanh), batch {batch}, softmax cross-entropy "
        f"({TIMES}; autodiff's exact diagonal needs {parameters:,} HVPs)",
        _timed(net, params, x, y, contenders, rounds),
        "gradient (hand)",
        {"parameters": parameters},
    )


def row_model_diag_ggn(name: str, problem: tuple, description: str, rounds: int, autodiff: bool = True) -> Row:
    net, params, x, y = problem
    contenders = {
        "diag GGN exact": jax.jit(diag_ggn(net, LOSS)),
        "kflr factors": jax.jit(kfac_factors(net, LOSS)),
    }
    if autodiff:  # left out of --quick: its compilation is most of the smoke test's time
        contenders["per-example vjp per output"] = per_example_vjp_diag_ggn(net)
    return Row(name, f"{description} ({TIMES})", _timed(net, params, x, y, contenders, rounds), "gradient (hand)")


def output_curvature(outputs, labels, tangent):
    """The loss's output Hessian applied to ``tangent`` by autodiff (``jax.jvp`` of ``jax.grad``)."""
    return jax.jvp(jax.grad(lambda o: LOSS.value(o, labels)), (outputs,), (tangent,))[1]


def autodiff_gvp(net: Any) -> Callable:
    """Autodiff's GGN-vector product ``f(params, x, labels, v)``: ``jax.jvp`` through the network, the loss's output
    Hessian, then ``jax.vjp`` back."""

    def gvp(p, inputs, labels, v):
        outputs, tangent = jax.jvp(lambda q: apply_layer(net, q, inputs), (p,), (v,))
        return jax.vjp(lambda q: apply_layer(net, q, inputs), p)[1](output_curvature(outputs, labels, tangent))[0]

    return gvp


def autodiff_hvp(net: Any) -> Callable:
    """Autodiff's Hessian-vector product ``f(params, x, labels, v)``: ``jax.jvp`` of ``jax.grad`` (forward over
    reverse, the cheapest)."""

    def hvp(p, inputs, labels, v):
        return jax.jvp(jax.grad(lambda q: LOSS.value(apply_layer(net, q, inputs), labels)), (p,), (v,))[1]

    return hvp


def row_forward_mode(widths: list[int], batch: int, rounds: int) -> Row:
    """Forward mode and the curvature-vector products on the G1 MLP, each beside autodiff's way to the same
    number: ``jax.jvp``; for ``GGN v``, ``jax.jvp`` then ``jax.vjp`` through the loss's Hessian, and
    ``jax.linearize`` with ``jax.linear_transpose``; for ``H v``, ``jax.jvp`` of ``jax.grad``."""
    net, params, x, y = mlp_problem(widths, batch)
    v = jax.tree_util.tree_map(lambda p: jax.random.normal(jax.random.key(3), p.shape, p.dtype), params)

    def apply(p, inputs):
        return apply_layer(net, p, inputs)

    def gvp_linearize(p, inputs, labels):
        outputs, linear = jax.linearize(lambda q: apply(q, inputs), p)
        transpose = jax.linear_transpose(linear, p)
        return transpose(output_curvature(outputs, labels, linear(v)))[0]

    hand_jvp, hand_gvp, hand_hvp = (
        jvp(net),
        ggn_vector_product(net, LOSS),
        hessian_vector_product(net, LOSS),
    )
    contenders = {
        "jvp (hand)": jax.jit(lambda p, inputs, labels: hand_jvp(p, inputs, v, inputs)),
        "jax.jvp": jax.jit(lambda p, inputs, labels: jax.jvp(lambda q, i: apply(q, i), (p, inputs), (v, inputs))),
        "GGN-vector (hand)": jax.jit(lambda p, inputs, labels: hand_gvp(p, inputs, labels, v)),
        "GGN-vector (jax.jvp + jax.vjp)": jax.jit(lambda p, inputs, labels: autodiff_gvp(net)(p, inputs, labels, v)),
        "GGN-vector (linearize + transpose)": jax.jit(gvp_linearize),
        "HVP (hand)": jax.jit(lambda p, inputs, labels: hand_hvp(p, inputs, labels, v)),
        "HVP (jax.jvp of jax.grad)": jax.jit(lambda p, inputs, labels: autodiff_hvp(net)(p, inputs, labels, v)),
    }
    return Row(
        "J1",
        f"forward mode and curvature-vector products, MLP {'-'.join(map(str, widths))} (ReLU), batch {batch}, "
        f"softmax cross-entropy ({TIMES})",
        _timed(net, params, x, y, contenders, rounds),
        "gradient (hand)",
    )


def scanned_steps(grads: Callable, optimizer: Any, period: int) -> Callable:
    """``period`` training steps of ``optimizer`` in one jitted ``lax.scan`` from a fresh optimizer state, told that
    ``grads`` are the batch's (as :func:`mnet.fit` does, so K-FAC takes its factored direction where it is the
    cheaper): ``(params, inputs, labels) -> the last step's loss``."""
    step = make_step(grads, optimizer, batch_gradient=True)

    def run(p, inputs, labels):
        def body(carry, key):
            p, state = carry
            p, state, value = step(p, state, inputs, labels, key)
            return (p, state), value

        keys = jax.random.split(jax.random.key(SEED), period)
        return jax.lax.scan(body, (p, optimizer.init(p)), keys)[1][-1]

    return jax.jit(run)


def row_kfac_step(widths: list[int], batch: int, rounds: int, period: int = 10) -> Row:
    """A K-FAC training step against an Adam step, both with hand-derived gradients, each timed as ``period``
    steps in one ``lax.scan`` (so K-FAC's inverse refresh, once per period, is amortised as in training); one
    contender keeps the dense form for comparison."""

    net, params, x, y = mlp_problem(widths, batch)
    grads = value_and_grad(net, LOSS)

    periodic = functools.partial(scanned_steps, grads, period=period)
    contenders = {
        f"Adam, {period} steps": periodic(optax.adam(1e-3)),
        f"K-FAC (kfac), {period} steps, inverses once": periodic(kfac(net, LOSS, (widths[0],), inverse_every=period)),
        f"K-FAC (kfac), {period} steps, inverses once, dense form": periodic(
            kfac(net, LOSS, (widths[0],), inverse_every=period, factored=False)
        ),
        f"K-FAC (kflr), {period} steps, inverses once": periodic(
            kfac(net, LOSS, (widths[0],), inverse_every=period, kind="kflr")
        ),
        f"K-FAC (kfac), {period} steps, factors and inverses once": periodic(
            kfac(net, LOSS, (widths[0],), inverse_every=period, factors_every=period)
        ),
        f"K-FAC (kfac), {period} steps, inverses every step": periodic(kfac(net, LOSS, (widths[0],), inverse_every=1)),
        f"EK-FAC (kfac), {period} steps, bases once": periodic(
            kfac(net, LOSS, (widths[0],), inverse_every=period, eigenvalue_correction=True)
        ),
    }
    seconds = _medians(contenders, params, x, y, rounds)
    return Row(
        "K1",
        f"K-FAC against Adam, MLP {'-'.join(map(str, widths))} (ReLU), batch {batch}, {period} training steps per "
        f"call (time as a multiple of Adam's: 1 / speed-up){lapack_threads()}",
        seconds,
        f"Adam, {period} steps",
    )


def row_kfac_amortised(widths: list[int], batch: int, rounds: int, period: int, factors_every: int) -> Row:
    """K-FAC as a run trains with it: ``period`` steps per call holding one refresh of the inverses, the batch's
    factors every ``factors_every`` steps, KL clipping on (and off, for comparison), against as many Adam steps.
    Its ratio is the amortised cost of a K-FAC step."""
    net, params, x, y = mlp_problem(widths, batch)
    grads = value_and_grad(net, LOSS)
    schedule = {"inverse_every": period, "factors_every": factors_every, "learning_rate": 1e-3}
    contenders = {
        f"Adam, {period} steps": scanned_steps(grads, optax.adam(1e-3), period),
        f"K-FAC (kfac), {period} steps, KL clipping": scanned_steps(
            grads, kfac(net, LOSS, (widths[0],), kl_clip=1e-3, **schedule), period
        ),
        f"K-FAC (kfac), {period} steps, no clipping": scanned_steps(
            grads, kfac(net, LOSS, (widths[0],), **schedule), period
        ),
    }
    seconds = _medians(contenders, params, x, y, rounds)
    return Row(
        "K2",
        f"K-FAC amortised, MLP {'-'.join(map(str, widths))} (ReLU), batch {batch}: {period} steps per call, the "
        f"inverses refreshed once, the factors every {factors_every} steps (time as a multiple of Adam's)"
        f"{lapack_threads()}",
        seconds,
        f"Adam, {period} steps",
    )


def lapack_threads() -> str:
    """On a CPU, the OpenBLAS threads that JAX's LAPACK calls run on (EK-FAC's ``eigh`` here; they compete with XLA's
    for the cores: ``docs/guide/performance.md``), for the K rows' titles; nothing elsewhere."""
    if jax.default_backend() != "cpu":
        return ""
    return f"; OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}"


def plans(quick: bool, rounds: int) -> dict[str, Any]:
    """The curvature rows for :func:`mnet.bench.run`. Rows with autodiff's per-example contender (seconds a call)
    run fewer rounds."""
    small = [784, 64, 10]
    few = min(rounds, 7)
    rows = {
        "G1": lambda: row_mlp_curvature(small if quick else [784, 512, 512, 10], 32 if quick else 128, few, "G1"),
        "G2": lambda: row_diag_hessian(small if quick else [784, 512, 512, 10], 32, rounds),
        "G3": lambda: row_model_diag_ggn(
            "G3", cnn_problem(16 if quick else 128), "exact GGN diagonal, digits CNN", few, not quick
        ),
        "G4": lambda: row_model_diag_ggn(
            "G4", transformer_problem(16 if quick else 128, 9), "exact GGN diagonal, transformer block", few, not quick
        ),
    }
    rows["J1"] = lambda: row_forward_mode(small if quick else [784, 512, 512, 10], 32 if quick else 128, rounds)
    # K-FAC's quick rows keep every factor within one leaf of the refresh's inverse (mnet.optim.inverse), which
    # compiles a loop per leaf
    kfac_widths = [100, 32, 10] if quick else [784, 512, 512, 10]
    rows["K1"] = lambda: row_kfac_step(kfac_widths, 32 if quick else 128, few)
    rows["K2"] = lambda: row_kfac_amortised(
        kfac_widths, 32 if quick else 128, min(rounds, 5), *((4, 2) if quick else (100, 10))
    )
    if not quick:  # the same code as G1 at a larger batch
        rows["G1b"] = lambda: row_mlp_curvature([784, 512, 512, 10], 512, rounds, "G1b")
        rows["G1v"] = lambda: row_autodiff_diag_ggn([784, 512, 512, 10], 128, min(rounds, 3))
    return rows
