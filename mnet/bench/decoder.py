"""Benchmark row M1: every derivative quantity on a LLaMA-style decoder (:func:`mnet.models.gpt`), each as a multiple
of one hand-derived gradient measured in the same run, beside autodiff's way to the same number. Like
:mod:`mnet.bench`, this module calls JAX's autodiff: it is a contender."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from mnet.bench.curvature import autodiff_gvp, autodiff_hvp
from mnet.bench.problems import vmapped_autodiff_grads
from mnet.bench.timing import Row, interleaved_medians
from mnet.checking.reference import autodiff_value_and_grad
from mnet.core.protocol import apply_layer
from mnet.losses import softmax_cross_entropy
from mnet.models import gpt
from mnet.quantities.diag_hessian import diag_hessian
from mnet.quantities.ggn import diag_ggn, ggn_vector_product
from mnet.quantities.gradient import value_and_grad
from mnet.quantities.hessian_vector import hessian_vector_product
from mnet.quantities.kronecker import kfac_factors
from mnet.quantities.per_example import per_example_grad_norms

LOSS = softmax_cross_entropy
#: The issue's decoder: d_model 256, 4 layers, 4 heads, 2 key-value heads, context 256, 97 symbols, batch 8,
#: blockwise attention in blocks of 64, float32.
FULL = {"d_model": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "context": 256, "batch": 8, "block": 64}
QUICK = {"d_model": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "context": 16, "batch": 2, "block": 8}
VOCAB = 97


def decoder_problem(shape: dict) -> tuple[Any, Any, jax.Array, jax.Array]:
    net = gpt(
        VOCAB,
        shape["context"],
        shape["d_model"],
        shape["num_layers"],
        shape["num_heads"],
        num_kv_heads=shape["num_kv_heads"],
        block_size=shape["block"],
    )
    _, params = net.init(jax.random.key(0), (shape["context"],), jnp.float32)
    ids = jax.random.randint(jax.random.key(1), (shape["batch"], shape["context"] + 1), 0, VOCAB)
    return net, params, ids[:, :-1], ids[:, 1:]


def autodiff_contenders(net: Any, v: Any) -> dict[str, Any]:
    """Autodiff's ways: the gradient, per-example norms by ``vmap(grad)``, the one-sample Monte-Carlo GGN diagonal
    by ``vmap(grad)`` at sampled labels, ``H v`` by ``jax.jvp`` of ``jax.grad``, ``GGN v`` by ``jax.jvp`` then
    ``jax.vjp``."""

    per_example_grads = vmapped_autodiff_grads(net)

    def norms(p, x, y):
        grads = per_example_grads(p, x, y)
        return jnp.sqrt(sum(jnp.sum(g.reshape(x.shape[0], -1) ** 2, axis=1) for g in jax.tree_util.tree_leaves(grads)))

    def mc_diag_ggn(p, x, y):
        logits = apply_layer(net, p, x)
        sampled = jax.random.categorical(jax.random.key(0), jax.lax.stop_gradient(logits))
        grads = per_example_grads(p, x, sampled)
        return jax.tree_util.tree_map(lambda g: jnp.mean(g * g, axis=0), grads)

    return {
        "gradient (jax.grad)": jax.jit(autodiff_value_and_grad(net, LOSS)),
        "per-example norms (vmap(grad))": jax.jit(norms),
        "diag GGN MC(1) (vmap(grad) at sampled labels)": jax.jit(mc_diag_ggn),
        "HVP (jax.jvp of jax.grad)": jax.jit(lambda p, x, y: autodiff_hvp(net)(p, x, y, v)),
        "GGN-vector (jax.jvp + jax.vjp)": jax.jit(lambda p, x, y: autodiff_gvp(net)(p, x, y, v)),
    }


def row_decoder(quick: bool, rounds: int) -> Row:
    """Row M1. The exact GGN and Hessian diagonals are left out at the full size: the loss Hessian's square root
    alone has ``context * vocab`` columns of one example's whole output each (24,832 x 8 x 256 x 97 floats, 20 GB),
    so the rows report their Monte-Carlo and Hutchinson estimates (one sample: one Hessian-vector product)."""
    shape = QUICK if quick else FULL
    net, params, x, y = decoder_problem(shape)
    v = jax.tree_util.tree_map(lambda p: jax.random.normal(jax.random.key(3), p.shape, p.dtype), params)
    key = jax.random.key(4)
    hand: dict[str, Any] = {
        "per-example norms (hand)": jax.jit(per_example_grad_norms(net, LOSS)),
        "diag GGN MC(1) (hand)": jax.jit(lambda p, xs, ys: diag_ggn(net, LOSS, mc_samples=1)(p, xs, ys, key=key)),
        "HVP (hand)": jax.jit(lambda p, xs, ys: hessian_vector_product(net, LOSS)(p, xs, ys, v)),
        "GGN-vector (hand)": jax.jit(lambda p, xs, ys: ggn_vector_product(net, LOSS)(p, xs, ys, v)),
        "kfac factors, 1 sample (hand)": jax.jit(
            lambda p, xs, ys: kfac_factors(net, LOSS, kind="kfac")(p, xs, ys, key=key)
        ),
        "diag Hessian, Hutchinson 1 (hand)": jax.jit(
            lambda p, xs, ys: diag_hessian(net, LOSS, hutchinson_samples=1)(p, xs, ys, key=key)
        ),
    }
    autodiff = autodiff_contenders(net, v)
    if quick:  # a smoke test: one quantity of each kind, so that the compilations stay few
        hand = {name: hand[name] for name in ("HVP (hand)",)}
        autodiff = {name: autodiff[name] for name in ("gradient (jax.grad)",)}
    calls = {"gradient (hand)": functools.partial(jax.jit(value_and_grad(net, LOSS)), params, x, y)}
    for name, fn in {**hand, **autodiff}.items():
        calls[name] = functools.partial(fn, params, x, y)
    parameters = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    return Row(
        "M1",
        f"decoder (models.gpt) d_model {shape['d_model']}, {shape['num_layers']} layers, {shape['num_heads']} heads, "
        f"{shape['num_kv_heads']} key-value heads, context {shape['context']}, vocabulary {VOCAB}, batch "
        f"{shape['batch']}, blockwise attention ({shape['block']}), float32, {parameters:,} parameters "
        "(time as a multiple of a hand-derived gradient: 1 / speed-up)",
        interleaved_medians(calls, rounds),
        "gradient (hand)",
        {"parameters": parameters},
    )
