"""The quantities of ``mnet bench --peers``' rows and every framework's way to each: mnet's, JAX autodiff's where it
has one, and the PyTorch peers' (:mod:`mnet.bench.peers`) where they are installed, each a
:class:`mnet.bench.peers.Contender` with the framework it belongs to. :mod:`mnet.bench.versus` checks and times them.
Like :mod:`mnet.bench`, this module calls JAX's autodiff: it is a contender.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnet.bench import peers
from mnet.bench.curvature import (
    LOSS,
    SEED,
    autodiff_gvp,
    autodiff_hvp,
    sampled_label_grads,
)
from mnet.bench.peers import Contender, TorchProblem
from mnet.bench.problems import vmapped_autodiff_grads
from mnet.checking.reference import autodiff_value_and_grad
from mnet.core.sums import batch_sq_norms
from mnet.optim.dp import clipped_value_and_grad
from mnet.quantities.diag_hessian import diag_hessian
from mnet.quantities.ggn import diag_ggn, ggn_vector_product
from mnet.quantities.gradient import value_and_grad
from mnet.quantities.gradient_moments import gradient_variance, sum_grad_squared
from mnet.quantities.hessian_vector import hessian_vector_product
from mnet.quantities.kronecker import is_factor_pair, kfac_factors
from mnet.quantities.one_pass import one_pass
from mnet.quantities.per_example import per_example_grad_norms, per_example_grads

#: Draws per example in the agreement check of a sampled quantity: its relative error against the exact quantity
#: is then about ``1 / sqrt(CHECK_SAMPLES)`` of the draws' spread, for every framework alike.
CHECK_SAMPLES = 256
#: The clipping norm of the DP rows: below most examples' gradient norms at initialisation, so clipping acts.
CLIP_NORM = 0.5
#: A sampled quantity's exact counterpart, the reference of its agreement check.
EXACT_OF = {"diag GGN MC(1)": "diag GGN exact", "KFAC factors MC(1)": "KFLR factors"}
#: The contenders of each quantity: ``{quantity: {contender: (framework, Contender)}}``.
Quantities = dict[str, dict[str, tuple[str, Contender]]]
#: Each framework's own gradient step, the unit of ``per_own_gradient``.
OWN_GRADIENT = {"mnet": "gradient · mnet", "jax": "gradient · jax.grad", "torch": "gradient · torch autograd"}


def factor_pairs(factors: Any) -> list:
    """mnet's Kronecker factors as ``(A without its bias row and column, G)`` per layer, the form every peer's
    factors are brought to (BackPACK keeps the bias apart)."""
    pairs = jax.tree_util.tree_leaves(factors, is_leaf=is_factor_pair)
    return [(np.asarray(p["A"])[:-1, :-1], np.asarray(p["G"])) for p in pairs if is_factor_pair(p)]


def jax_contender(fn: Callable, params: Any, x: Any, y: Any, convert: Callable = lambda out: out, **kw) -> Contender:
    """A jitted JAX function of ``(params, x, y)`` as a contender (ahead-of-time compiled when timed, so its XLA
    memory analysis is recorded)."""
    jitted = jax.jit(functools.partial(fn, **kw)) if kw else jax.jit(fn)
    return Contender(functools.partial(jitted, params, x, y), convert)


def sampled(contender: Contender, check: Callable[[], Any]) -> Contender:
    """A sampled quantity's contender whose agreement is checked by ``check`` (many draws) instead of its call."""
    return Contender(contender.call, contender.convert, check)


def gradient_contenders(problem: TorchProblem, available: dict) -> dict[str, tuple[str, Contender]]:
    """Each framework's gradient of the mean loss, the unit of every row."""
    net, params, x, y = problem.net, problem.params, problem.x, problem.labels
    found = {
        OWN_GRADIENT["mnet"]: ("mnet", jax_contender(value_and_grad(net, LOSS), params, x, y, lambda out: out[1])),
        OWN_GRADIENT["jax"]: ("jax", jax_contender(autodiff_value_and_grad(net, LOSS), params, x, y, lambda o: o[1])),
    }
    if installed(available, "torch"):
        found[OWN_GRADIENT["torch"]] = ("torch", peers.autograd_gradient(problem))
    return found


def installed(available: dict, peer: str) -> bool:
    """Whether :func:`mnet.bench.peers.availability` found ``peer``."""
    return not str(available.get(peer, "skipped")).startswith("skipped")


def _norms_of(per_example: Any) -> Any:
    leaves = jax.tree_util.tree_leaves(per_example)
    return jnp.sqrt(batch_sq_norms(per_example, leaves[0].shape[0], leaves[0].dtype))


def _clipped_of(per_example: Any) -> Any:
    norms = _norms_of(per_example)
    scale = jnp.minimum(1.0, CLIP_NORM / (norms + 1e-12)) / norms.shape[0]
    return jax.tree_util.tree_map(lambda g: jnp.einsum("b,b...->...", scale, g), per_example)


def first_order_quantities(problem: TorchProblem, available: dict) -> Quantities:
    """The per-example gradients' norms and DP-SGD's clipped mean gradient, with Opacus' and torch.func's."""
    net, params, x, y = problem.net, problem.params, problem.x, problem.labels
    autodiff_grads = vmapped_autodiff_grads(net)
    quantities: Quantities = {
        "per-example norms": {
            "mnet": ("mnet", jax_contender(per_example_grad_norms(net, LOSS), params, x, y)),
            "vmap(jax.grad)": ("jax", jax_contender(lambda p, a, b: _norms_of(autodiff_grads(p, a, b)), params, x, y)),
        },
        "clipped mean gradient": {
            "mnet": ("mnet", jax_contender(clipped_value_and_grad(net, LOSS, CLIP_NORM), params, x, y, lambda o: o[1])),
            "vmap(jax.grad)": (
                "jax",
                jax_contender(lambda p, a, b: _clipped_of(autodiff_grads(p, a, b)), params, x, y),
            ),
        },
    }
    norms, clipped = quantities["per-example norms"], quantities["clipped mean gradient"]
    if installed(available, "BackPACK"):
        n = x.shape[0]  # BackPACK's per-example gradients are those of l_b / n
        to_norms = lambda out: n * np.sqrt(sum(t.numpy() for t in out))  # noqa: E731
        norms["BackPACK BatchL2Grad"] = ("torch", peers.backpack(problem, "BatchL2Grad", "batch_l2", to_norms))
    if installed(available, "Opacus"):
        norms["Opacus"] = ("torch", peers.opacus_per_sample(problem, peers.norms, _numpy))
        clipped["Opacus ghost clipping"] = ("torch", peers.opacus_ghost_clipping(problem, CLIP_NORM))
    if installed(available, "torch.func"):
        norms["torch.func"] = ("torch", peers.torch_func_per_example(problem, peers.norms, _numpy))
        clip = functools.partial(peers.clipped_mean, clip_norm=CLIP_NORM)
        clipped["torch.func"] = ("torch", peers.torch_func_per_example(problem, clip, problem.layout))
    return quantities


def curvature_quantities(problem: TorchProblem, available: dict) -> Quantities:
    """The GGN's diagonal (exact and sampled), its Kronecker factors (KFLR and sampled KFAC) and the curvature-vector
    products, with BackPACK's and curvlinops'."""
    net, params, x, y = problem.net, problem.params, problem.x, problem.labels
    key = jax.random.key(SEED)
    v = jax.tree_util.tree_map(lambda p: jax.random.normal(jax.random.key(3), p.shape, p.dtype), params)
    one_draw_grads = jax_contender(sampled_label_grads(net), params, x, y, key=key)
    quantities: Quantities = {
        "diag GGN exact": {"mnet": ("mnet", jax_contender(diag_ggn(net, LOSS), params, x, y))},
        "diag GGN MC(1)": {
            "mnet": ("mnet", _mnet_sampled(diag_ggn, problem, key, _id)),
            # checked against the exact diagonal with as many draws as the others
            "vmap(jax.grad), sampled labels": (
                "jax",
                sampled(one_draw_grads, lambda: _many_draws(sampled_label_grads(net), params, x, y)),
            ),
        },
        "KFLR factors": {"mnet": ("mnet", jax_contender(kfac_factors(net, LOSS), params, x, y, factor_pairs))},
        "KFAC factors MC(1)": {"mnet": ("mnet", _mnet_sampled(_sampled_kfac, problem, key, factor_pairs))},
        "GGN-vector product": {
            "mnet": ("mnet", jax_contender(lambda p, a, b: ggn_vector_product(net, LOSS)(p, a, b, v), params, x, y)),
            "jax.jvp + jax.vjp": ("jax", jax_contender(lambda p, a, b: autodiff_gvp(net)(p, a, b, v), params, x, y)),
        },
        "Hessian-vector product": {
            "mnet": (
                "mnet",
                jax_contender(lambda p, a, b: hessian_vector_product(net, LOSS)(p, a, b, v), params, x, y),
            ),
            "jax.jvp of jax.grad": ("jax", jax_contender(lambda p, a, b: autodiff_hvp(net)(p, a, b, v), params, x, y)),
        },
    }
    if installed(available, "BackPACK"):
        _add_backpack_curvature(quantities, problem)
    if installed(available, "curvlinops"):
        _add_curvlinops_curvature(quantities, problem, v)
    return quantities


def mlp_quantities(problem: TorchProblem, available: dict) -> Quantities:
    """The MLP row's quantities (P1): per quantity, its contenders by name with their framework."""
    return {
        **first_order_quantities(problem, available),
        **curvature_quantities(problem, available),
        **moment_quantities(problem, available),
        **combined_quantities(problem, available),
    }


def _id(out: Any) -> Any:
    return out


def _numpy(tensor: Any) -> Any:
    return tensor.detach().numpy()


def _sampled_kfac(net: Any, loss: Any, mc_samples: int) -> Callable:
    return kfac_factors(net, loss, kind="kfac", mc_samples=mc_samples)


def _mnet_sampled(quantity: Callable, problem: TorchProblem, key: Any, convert: Callable) -> Contender:
    """mnet's one-draw estimate (``quantity(net, loss, mc_samples=1)``), timed, checked by its
    ``CHECK_SAMPLES``-draw estimate."""
    net, params, x, y = problem.net, problem.params, problem.x, problem.labels
    timed = jax_contender(quantity(net, LOSS, mc_samples=1), params, x, y, convert, key=key)
    many = jax.jit(quantity(net, LOSS, mc_samples=CHECK_SAMPLES))
    return sampled(timed, lambda: convert(many(params, x, y, key=key)))


def _many_draws(one_draw: Callable, params: Any, x: Any, y: Any) -> Any:
    """The mean of ``CHECK_SAMPLES`` one-draw estimates (one at a time: each holds every per-example gradient)."""
    keys = jax.random.split(jax.random.key(SEED + 1), CHECK_SAMPLES)
    draws = jax.jit(lambda p, a, b: jax.lax.map(lambda k: one_draw(p, a, b, key=k), keys))(params, x, y)
    return jax.tree_util.tree_map(lambda d: d.mean(0), draws)


def _add_backpack_curvature(quantities: Quantities, problem: TorchProblem) -> None:
    layout, factors = problem.layout, peers.backpack_factors
    quantities["diag GGN exact"]["BackPACK DiagGGNExact"] = (
        "torch",
        peers.backpack(problem, "DiagGGNExact", "diag_ggn_exact", layout),
    )
    many = peers.backpack(problem, "DiagGGNMC", "diag_ggn_mc", layout, mc_samples=CHECK_SAMPLES)
    one = peers.backpack(problem, "DiagGGNMC", "diag_ggn_mc", layout, mc_samples=1)
    quantities["diag GGN MC(1)"]["BackPACK DiagGGNMC"] = ("torch", sampled(one, many.value))
    quantities["KFLR factors"]["BackPACK KFLR"] = ("torch", peers.backpack(problem, "KFLR", "kflr", factors))
    many = peers.backpack(problem, "KFAC", "kfac", factors, mc_samples=CHECK_SAMPLES)
    one = peers.backpack(problem, "KFAC", "kfac", factors, mc_samples=1)
    quantities["KFAC factors MC(1)"]["BackPACK KFAC"] = ("torch", sampled(one, many.value))


def _add_curvlinops_curvature(quantities: Quantities, problem: TorchProblem, v: Any) -> None:
    quantities["KFLR factors"]["curvlinops KFAC (type-2)"] = ("torch", peers.curvlinops_factors(problem, "type-2"))
    many = peers.curvlinops_factors(problem, "mc", CHECK_SAMPLES)
    quantities["KFAC factors MC(1)"]["curvlinops KFAC (mc)"] = (
        "torch",
        sampled(peers.curvlinops_factors(problem, "mc"), many.value),
    )
    quantities["GGN-vector product"]["curvlinops"] = (
        "torch",
        peers.curvlinops_product(problem, "GGNLinearOperator", v),
    )
    quantities["Hessian-vector product"]["curvlinops"] = (
        "torch",
        peers.curvlinops_product(problem, "HessianLinearOperator", v),
    )


def moment_quantities(problem: TorchProblem, available: dict) -> Quantities:
    """The per-example gradients' moments over the batch (BackPACK's first-order extensions ``SumGradSquared`` and
    ``Variance``, of the terms ``l_b / n``: both are ``1 / n^2`` of mnet's, which the conversion undoes)."""
    net, params, x, y = problem.net, problem.params, problem.x, problem.labels
    n = x.shape[0]
    autodiff_grads = vmapped_autodiff_grads(net)

    def squares(p, a, b):
        return jax.tree_util.tree_map(lambda g: jnp.sum(g * g, 0), autodiff_grads(p, a, b))

    def variance(p, a, b):
        return jax.tree_util.tree_map(lambda g: jnp.var(g, 0), autodiff_grads(p, a, b))

    quantities = {
        "sum of squared gradients": {
            "mnet": ("mnet", jax_contender(sum_grad_squared(net, LOSS), params, x, y)),
            "vmap(jax.grad)": ("jax", jax_contender(squares, params, x, y)),
        },
        "gradient variance": {
            "mnet": ("mnet", jax_contender(gradient_variance(net, LOSS), params, x, y)),
            "vmap(jax.grad)": ("jax", jax_contender(variance, params, x, y)),
        },
    }
    if installed(available, "BackPACK"):
        undo_scale = lambda out: problem.layout([t * n * n for t in out])  # noqa: E731
        quantities["sum of squared gradients"]["BackPACK SumGradSquared"] = (
            "torch",
            peers.backpack(problem, "SumGradSquared", "sum_grad_squared", undo_scale),
        )
        quantities["gradient variance"]["BackPACK Variance"] = (
            "torch",
            peers.backpack(problem, "Variance", "variance", undo_scale),
        )
    return quantities


#: The quantities of the one-call row, as :func:`mnet.one_pass` names them.
COMBINED = ("grad", "per_example_grad_norms", "diag_ggn")


def combined_quantities(problem: TorchProblem, available: dict) -> Quantities:
    """The gradient, the per-example gradients' norms and the exact GGN diagonal together: mnet's one call
    (:func:`mnet.one_pass`), mnet's three separate calls (the sum it should beat), and BackPACK's ``BatchL2Grad`` and
    ``DiagGGNExact`` riding on one backward pass (BackPACK's own way to several quantities)."""
    net, params, x, y = problem.net, problem.params, problem.x, problem.labels
    calls = [
        jax.jit(value_and_grad(net, LOSS)),
        jax.jit(per_example_grad_norms(net, LOSS)),
        jax.jit(diag_ggn(net, LOSS)),
    ]

    def three_calls() -> tuple:
        return tuple(call(params, x, y) for call in calls)

    found = {
        "mnet": (
            "mnet",
            jax_contender(one_pass(net, LOSS, COMBINED), params, x, y, lambda o: tuple(o[q] for q in COMBINED)),
        ),
        "three calls": ("mnet", Contender(three_calls, lambda o: (o[0][1], *o[1:]))),
    }
    if installed(available, "BackPACK"):
        n = x.shape[0]  # BackPACK's per-example gradients are those of l_b / n

        def convert(out: dict) -> tuple:
            norms = n * np.sqrt(sum(t.numpy() for t in out["batch_l2"]))
            return problem.layout(out["grad"]), norms, problem.layout(out["diag_ggn_exact"])

        extensions = {"BatchL2Grad": "batch_l2", "DiagGGNExact": "diag_ggn_exact"}
        found["BackPACK BatchL2Grad + DiagGGNExact, one backward"] = (
            "torch",
            peers.backpack_together(problem, extensions, convert),
        )
    return {"gradient, norms and diag GGN together": found}


def tanh_quantities(problem: TorchProblem, available: dict) -> Quantities:
    """The exact Hessian diagonal (a tanh MLP: ReLU's second derivative is zero, so its diagonal is the GGN's)."""
    x, y = problem.x, problem.labels
    found = {"mnet": ("mnet", jax_contender(diag_hessian(problem.net, LOSS), problem.params, x, y))}
    if installed(available, "BackPACK"):
        found["BackPACK DiagHessian"] = ("torch", peers.backpack(problem, "DiagHessian", "diag_h", problem.layout))
    return {"diag Hessian": found}


def cnn_quantities(problem: TorchProblem, available: dict) -> Quantities:
    """The CNN row's quantities: the exact GGN diagonal and every example's gradient."""
    net, params = problem.net, problem.params
    x, y = problem.x, problem.labels
    n = x.shape[0]
    quantities: Quantities = {
        "diag GGN exact": {"mnet": ("mnet", jax_contender(diag_ggn(net, LOSS), params, x, y))},
        "per-example gradients": {
            "mnet": ("mnet", jax_contender(per_example_grads(net, LOSS), params, x, y)),
            "vmap(jax.grad)": ("jax", jax_contender(vmapped_autodiff_grads(net), params, x, y)),
        },
    }
    stack = functools.partial(peers.stack_examples, problem)
    if installed(available, "BackPACK"):
        quantities["diag GGN exact"]["BackPACK DiagGGNExact"] = (
            "torch",
            peers.backpack(problem, "DiagGGNExact", "diag_ggn_exact", problem.layout),
        )
        quantities["per-example gradients"]["BackPACK BatchGrad"] = (
            "torch",
            peers.backpack(problem, "BatchGrad", "grad_batch", lambda out: stack([t * n for t in out])),
        )
    if installed(available, "Opacus"):
        quantities["per-example gradients"]["Opacus"] = ("torch", peers.opacus_per_sample(problem, _id, stack))
    if installed(available, "torch.func"):
        quantities["per-example gradients"]["torch.func"] = ("torch", peers.torch_func_per_example(problem, _id, stack))
    return quantities
