"""The PyTorch peers of ``mnet bench --peers``: BackPACK, curvlinops, Opacus, torch.func and plain autograd, each
computing a quantity mnet computes, on the same weights and the same batch.

Every contender here is a pair: a call with no arguments (what is timed: one forward and backward pass of the peer,
its result left as the peer leaves it) and a conversion of that result into mnet's layout and convention (what the
agreement check compares with mnet's own number). The conventions differ in scale: BackPACK's per-example
quantities belong to the mean loss's terms ``l_b / N``, Opacus rescales its per-sample gradients to each ``l_b``;
every conversion says what it undoes.

The problems are built in PyTorch first and brought to mnet by :func:`mnet.interop.from_torch`, so both frameworks
hold the same weights; a per-parameter result becomes mnet's layout the same way (the conversion is linear in every
weight). :func:`availability`, which runs before torch is imported, sets ``GOMP_SPINCOUNT`` (unless it is set) so
that PyTorch's idle OpenMP threads spin for at most 10,000 rounds before they sleep: with the default (300,000)
they spin on after each call and take the cores from XLA's threads in the interleaved timing (a 2.5 ms step once
took 26-246 ms on a loaded 2-core machine), while ``OMP_WAIT_POLICY=PASSIVE`` (no spinning at all) slows PyTorch's
own gradient from 3.2 to 5.6-7.0 ms on the 2-core machine; with 10,000 rounds it takes 2.9-3.7 ms, as with the
default.
"""

from __future__ import annotations

import copy
import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnet.interop.torch_bridge import from_torch
from mnet.models import mlp

#: The peers: the module each imports and the distribution that installs it (torch.func comes with torch).
PEER_MODULES = {
    "torch": ("torch", "torch"),
    "torch.func": ("torch.func", "torch"),
    "BackPACK": ("backpack", "backpack-for-pytorch"),
    "curvlinops": ("curvlinops", "curvlinops-for-pytorch"),
    "Opacus": ("opacus", "opacus"),
}


def availability() -> dict[str, str]:
    """Each peer's version where it imports, else ``"skipped: ..."`` with the reason (recorded in the result)."""
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # read when torch's OpenMP starts: see the module's text
    found = {}
    for peer, (module, distribution) in PEER_MODULES.items():
        try:
            with warnings.catch_warnings():  # curvlinops' linear_operator scripts functions at import (deprecated)
                warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
                importlib.import_module(module)
        except Exception as error:  # absent, or broken against this torch
            found[peer] = f"skipped: {module} cannot be imported ({type(error).__name__}: {error})"[:160]
            continue
        found[peer] = metadata.version(distribution)
    return found


@dataclass
class Contender:
    """A way to a quantity: ``call()`` is timed; ``convert(call())`` is the result in mnet's layout, which the
    agreement check compares with mnet's, unless ``check`` is given (a sampled quantity's many-draw estimate,
    already converted)."""

    call: Callable[[], Any]
    convert: Callable[[Any], Any]
    check: Callable[[], Any] | None = None

    def value(self) -> Any:
        """What the agreement check compares."""
        return self.check() if self.check is not None else self.convert(self.call())


@dataclass
class TorchProblem:
    """A PyTorch model with its batch ``X, y`` (tensors), and the same network in mnet with the same weights and the
    same batch ``x, labels`` (JAX arrays). Without torch (:func:`mnet_only`) the PyTorch side is None."""

    model: Any
    X: Any
    y: Any
    net: Any
    params: Any
    x: Any = None
    labels: Any = None

    def __post_init__(self) -> None:

        if self.x is None:
            self.x, self.labels = jnp.asarray(self.X.numpy()), jnp.asarray(self.y.numpy())

    def loss(self, outputs: Any) -> Any:
        import torch  # optional: a peer (pip install '.[peers]')

        return torch.nn.functional.cross_entropy(outputs, self.y)

    def layout(self, tensors: list) -> Any:
        """Per-parameter tensors (in ``model.parameters()`` order, each of its parameter's shape) as mnet params."""
        holder = copy.deepcopy(self.model)
        for parameter, tensor in zip(holder.parameters(), tensors):
            parameter.data = tensor.detach().clone().reshape(parameter.shape)
        return from_torch(holder)[1]

    def from_layout(self, tree: Any) -> list:
        """A tree like mnet's params as tensors in ``model.parameters()`` order (the leaves' order is the same)."""
        import torch  # optional: a peer (pip install '.[peers]')

        return [
            torch.from_numpy(np.array(torch_layout(np.asarray(leaf), tuple(parameter.shape))))
            for leaf, parameter in zip(jax.tree_util.tree_leaves(tree), self.model.parameters())
        ]


def torch_layout(leaf: np.ndarray, shape: tuple) -> np.ndarray:
    """An mnet leaf in PyTorch's layout: a Linear's ``W`` is ``weight.T``; a Conv2d's rows are ``(kh, kw, c_in)``
    against PyTorch's OIHW; a bias is itself."""
    if len(shape) == 2:
        return leaf.T
    if len(shape) == 4:
        out, c_in, kh, kw = shape
        return leaf.reshape(kh, kw, c_in, out).transpose(3, 2, 0, 1)
    return leaf.reshape(shape)


def mlp_problem(widths: list[int], batch: int, activation: str = "relu", seed: int = 0) -> TorchProblem:
    """An MLP of ``widths`` in PyTorch (``ReLU`` or ``Tanh`` between its ``Linear`` layers), a standard normal
    batch and uniform labels, and the same in mnet; without torch, mnet's own MLP alone."""
    try:
        import torch  # optional: a peer (pip install '.[peers]')
    except ImportError:
        return mnet_only(widths, batch, activation, seed)

    torch.manual_seed(seed)
    layers: list = []
    for n_in, n_out in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(n_in, n_out), torch.nn.ReLU() if activation == "relu" else torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers[:-1])
    X = torch.randn(batch, widths[0])
    y = torch.randint(0, widths[-1], (batch,))
    net, params = from_torch(model)
    return TorchProblem(model, X, y, net, params)


def mnet_only(widths: list[int], batch: int, activation: str, seed: int) -> TorchProblem:
    """The MLP of :func:`mlp_problem` in mnet alone (where torch is absent: JAX's autodiff is then the only peer)."""

    net = mlp(widths[1:], activation=activation)
    _, params = net.init(jax.random.key(seed), (widths[0],))
    x = jax.random.normal(jax.random.key(seed + 1), (batch, widths[0]))
    labels = jax.random.randint(jax.random.key(seed + 2), (batch,), 0, widths[-1])
    return TorchProblem(None, None, None, net, params, x, labels)


def cnn_problem(batch: int, channels: tuple[int, int] = (16, 32), seed: int = 0) -> TorchProblem:
    """A CNN on 28x28 one-channel images: two 3x3 convolutions (padding 1) each with ReLU and 2x2 max pooling, then
    a linear layer to 10 classes; a standard normal batch (NCHW) and uniform labels, and the same in mnet."""
    import torch  # optional: a peer (pip install '.[peers]')

    torch.manual_seed(seed)
    first, second = channels
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, first, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(first, second, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(second * 7 * 7, 10),
    )
    X = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    net, params = from_torch(model)
    return TorchProblem(model, X, y, net, params)


def stack_examples(problem: TorchProblem, per_example: list) -> Any:
    """Per-example tensors ``(batch, *shape)`` in ``model.parameters()`` order as mnet params with a batch axis."""

    examples = [problem.layout([t[b] for t in per_example]) for b in range(per_example[0].shape[0])]
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *examples)


def norms(per_example: list) -> Any:
    """Each example's gradient norm over all parameters."""
    return sum(t.flatten(1).square().sum(1) for t in per_example).sqrt()


def clipped_mean(per_example: list, clip_norm: float) -> list:
    import torch  # optional: a peer (pip install '.[peers]')

    """Opacus' and DP-SGD's clipped mean: ``mean_b g_b min(1, C / ||g_b||)``."""
    scale = torch.clamp(clip_norm / (norms(per_example) + 1e-12), max=1.0) / per_example[0].shape[0]
    return [torch.einsum("b,b...->...", scale, t) for t in per_example]


def autograd_gradient(problem: TorchProblem) -> Contender:
    """PyTorch's own gradient of the mean loss: one forward, one ``backward()``."""
    model = problem.model

    def call() -> list:
        model.zero_grad(set_to_none=True)
        problem.loss(model(problem.X)).backward()
        return [p.grad for p in model.parameters()]

    return Contender(call, problem.layout)


def backpack(problem: TorchProblem, extension: str, attribute: str, convert: Callable, **options: Any) -> Contender:
    """One of BackPACK's extensions (``DiagGGNExact``, ``BatchL2Grad``, ...) in one backward pass of an extended
    copy of the model, the result read from each parameter's ``attribute``; ``convert`` takes the list of them."""
    return backpack_together(problem, {extension: attribute}, lambda out: convert(out[attribute]), **options)


def backpack_together(
    problem: TorchProblem, extensions: dict[str, str], convert: Callable, **options: Any
) -> Contender:
    """Several of BackPACK's extensions (``{extension: attribute}``) and the gradient from one backward pass of an
    extended copy of the model: ``call()`` returns ``{"grad": [...], attribute: [...]}``, a list per parameter."""
    import torch  # optional: a peer (pip install '.[peers]')
    from backpack import backpack as backpack_context  # optional: a peer (pip install '.[peers]')
    from backpack import extend  # optional: a peer (pip install '.[peers]')
    from backpack import extensions as known  # optional: a peer (pip install '.[peers]')

    model = extend(copy.deepcopy(problem.model))
    loss = extend(torch.nn.CrossEntropyLoss())
    chosen = [getattr(known, extension)(**options) for extension in extensions]

    def call() -> dict:
        model.zero_grad(set_to_none=True)
        with backpack_context(*chosen):
            loss(model(problem.X), problem.y).backward()
        found = {attribute: [getattr(p, attribute) for p in model.parameters()] for attribute in extensions.values()}
        return {"grad": [p.grad for p in model.parameters()], **found}

    return Contender(call, convert)


def backpack_factors(outputs: list) -> list:
    """BackPACK's ``[G, A]`` per weight (its bias has ``[G]``) as ``(A, G)`` per layer."""
    return [(A.numpy(), G.numpy()) for G, A in (factors for factors in outputs if len(factors) == 2)]


def curvlinops_factors(problem: TorchProblem, fisher_type: str, mc_samples: int = 1) -> Contender:
    """curvlinops' ``KFACLinearOperator`` (weight and bias together), its factors computed afresh each call."""
    import torch  # optional: a peer (pip install '.[peers]')
    from curvlinops import KFACLinearOperator  # optional: a peer (pip install '.[peers]')

    params = list(problem.model.parameters())

    def call() -> Any:
        operator = KFACLinearOperator(
            problem.model,
            torch.nn.CrossEntropyLoss(),
            params,
            [(problem.X, problem.y)],
            fisher_type=fisher_type,
            mc_samples=mc_samples,
            separate_weight_and_bias=False,
            check_deterministic=False,
        )
        operator.compute_kronecker_factors()
        return operator.state_dict()

    def convert(state: dict) -> list:
        inputs, gradients = state["input_covariances"], state["gradient_covariances"]
        # The appended 1 is the last row of curvlinops' input covariance, as of mnet's A: both drop it here.
        return [(inputs[name].numpy()[:-1, :-1], gradients[name].numpy()) for name in sorted(inputs, key=int)]

    return Contender(call, convert)


def curvlinops_product(problem: TorchProblem, operator: str, v: Any) -> Contender:
    """curvlinops' ``GGNLinearOperator`` or ``HessianLinearOperator`` applied to ``v`` (mnet params' layout)."""
    import curvlinops  # optional: a peer (pip install '.[peers]')
    import torch  # optional: a peer (pip install '.[peers]')

    made = getattr(curvlinops, operator)(
        problem.model,
        torch.nn.CrossEntropyLoss(),
        list(problem.model.parameters()),
        [(problem.X, problem.y)],
        check_deterministic=False,
    )
    vector = problem.from_layout(v)
    return Contender(lambda: made @ vector, problem.layout)


def opacus_per_sample(problem: TorchProblem, reduce: Callable[[list], Any], convert: Callable) -> Contender:
    """Opacus' ``GradSampleModule`` (hooks with a per-layer rule; each example's gradient of its own ``l_b``),
    then ``reduce`` of the per-sample gradients (the norms, the clipped mean, or themselves)."""
    from opacus import GradSampleModule  # optional: a peer (pip install '.[peers]')

    module = GradSampleModule(copy.deepcopy(problem.model))

    def call() -> Any:
        module.zero_grad(set_to_none=True)
        problem.loss(module(problem.X)).backward()
        return reduce([p.grad_sample for p in module.parameters()])

    return Contender(call, convert)


def opacus_ghost_clipping(problem: TorchProblem, clip_norm: float) -> Contender:
    """Opacus' ghost clipping (``GradSampleModuleFastGradientClipping``): the per-example norms without per-example
    gradients, then a second backward pass of the clipped, reweighted loss; no noise (``noise_multiplier=0``)."""
    # optional: a peer (pip install '.[peers]')
    import torch
    from opacus.grad_sample import GradSampleModuleFastGradientClipping  # optional: a peer
    from opacus.optimizers import DPOptimizerFastGradientClipping  # optional: a peer

    # optional: a peer
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    module = GradSampleModuleFastGradientClipping(copy.deepcopy(problem.model), max_grad_norm=clip_norm)
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(module.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=clip_norm,
        expected_batch_size=problem.X.shape[0],
    )
    criterion = DPLossFastGradientClipping(module, optimizer, torch.nn.CrossEntropyLoss(reduction="mean"))

    def call() -> list:
        optimizer.zero_grad(set_to_none=True)
        criterion(module(problem.X), problem.y).backward()
        return [p.grad for p in module.parameters()]

    # The second pass leaves the sum of the clipped gradients; Opacus' optimizer divides by the batch when it steps.
    return Contender(call, lambda grads: problem.layout([g / problem.X.shape[0] for g in grads]))


def torch_func_per_example(problem: TorchProblem, reduce: Callable[[list], Any], convert: Callable) -> Contender:
    """``torch.func.vmap(torch.func.grad(...))`` of each example's loss through ``functional_call``, then
    ``reduce`` of the per-example gradients."""
    import torch  # optional: a peer (pip install '.[peers]')
    from torch.func import functional_call, grad, vmap  # optional: a peer (pip install '.[peers]')

    model = problem.model
    names = [name for name, _ in model.named_parameters()]
    weights = {name: p.detach() for name, p in model.named_parameters()}

    def one(w: dict, x: Any, y: Any) -> Any:
        return torch.nn.functional.cross_entropy(functional_call(model, w, (x[None],)), y[None])

    per_example = vmap(grad(one), in_dims=(None, 0, 0))
    return Contender(lambda: reduce([per_example(weights, problem.X, problem.y)[n] for n in names]), convert)
