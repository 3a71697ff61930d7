"""Layers: hyperparameters in an immutable object, forward and hand-derived backward side by side.

Conventions (rows are examples): ``x`` has shape ``(batch, *example_shape)``. Every layer has

* ``init(key, input_shape, dtype=None) -> (output_shape, params)``, shapes without the batch axis;
* ``forward(params, x) -> (y, cache)``;
* ``backward(params, cache, dy) -> (dparams, dx)``, the vector-Jacobian product derived by hand;
* ``apply(params, x) -> y``.

A cache is a pytree of arrays only (so that it can cross ``jax.jit`` and ``jax.custom_vjp`` boundaries).
Layers check shapes where they enter and raise :class:`mnet.errors.LayerError` naming themselves and the
shapes; ``serial`` adds the position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from mnet import activations, initializers
from mnet.errors import LayerError

Array = jax.Array
Params = Any
Cache = Any
Shape = tuple[int, ...]


def default_float_dtype() -> jnp.dtype:
    """float64 when JAX x64 is on, float32 otherwise."""
    return jnp.zeros(()).dtype


class Layer:
    """Base class of every layer. Subclasses are frozen dataclasses (immutable and hashable) and define
    ``init``, ``forward`` and ``backward``; ``apply`` follows from ``forward``.

    A layer with randomness (dropout) sets ``stochastic = True`` and takes
    ``forward(params, x, *, key=None, train=False)``; combinators pass a key and the train flag only to
    stochastic children, so the deterministic call ``forward(params, x)`` works for every network."""

    stochastic = False

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        raise NotImplementedError

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        raise NotImplementedError

    def backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        raise NotImplementedError

    def apply(self, params: Params, x: Array, **kwargs) -> Array:
        """The output alone: ``forward(params, x)[0]``."""
        return self.forward(params, x, **kwargs)[0]

    # Derivatives beyond the gradient (used by mnet.derivatives). A layer with structure overrides them; the
    # defaults derive each from the one before, and a layer with no per-example rule at all makes
    # mnet.derivatives run the network one example at a time under jax.vmap instead.
    def per_example_backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        """Like ``backward`` for a ``dy`` whose rows are separate examples' cotangents, but every leaf of
        ``dparams`` keeps a leading batch axis: row ``b`` is example ``b``'s own parameter gradient.

        Default: a layer without parameters has nothing per-example to add, so its ``backward`` serves as is;
        a layer with parameters must supply its own rule (or be handled by mnet.derivatives' generic path)."""
        if params != ():
            raise NotImplementedError(f"{self!r} has no per-example backward rule")
        return self.backward(params, cache, dy)

    def per_example_sq_norms(self, params: Params, cache: Cache, dy: Array) -> tuple[Array, Array]:
        """``(sq, dx)``: ``sq[b]`` is the squared L2 norm of example ``b``'s parameter gradient (over all of this
        layer's leaves). Default: from :meth:`per_example_backward`."""
        grads, dx = self.per_example_backward(params, cache, dy)
        return batch_sq_norms(grads, dy.shape[0], dy.dtype), dx

    def ntk_contribution(self, params: Params, cache1: Cache, cache2: Cache, dys1: Array, dys2: Array) -> Array:
        """This layer's share of the empirical NTK, ``sum_k sum_p J1[a, k, p] J2[c, k, p]`` over its own
        parameters ``p``, as ``(batch1, batch2)``. ``dys1``/``dys2`` are ``(K, batch, *output)``: for each network
        output ``k``, the cotangent that reaches this layer's output. Default: contract per-example gradients."""
        per1 = jax.vmap(lambda dy: self.per_example_backward(params, cache1, dy)[0])(dys1)
        per2 = jax.vmap(lambda dy: self.per_example_backward(params, cache2, dy)[0])(dys2)
        total = jnp.zeros((dys1.shape[1], dys2.shape[1]), dys1.dtype)
        for g1, g2 in zip(jax.tree_util.tree_leaves(per1), jax.tree_util.tree_leaves(per2)):
            total = total + jnp.einsum("kap,kcp->ac", g1.reshape(g1.shape[:2] + (-1,)), g2.reshape(g2.shape[:2] + (-1,)))
        return total

    # Helpers for the checks every layer makes at its boundary.
    def _fail(self, detail: str) -> LayerError:
        return LayerError(self, detail)

    def _check_input(self, x: Array, min_rank: int = 2) -> None:
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise self._fail(f"expects an array input, got {type(x).__name__}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise self._fail(f"expects a floating-point input, got dtype {x.dtype} with shape {tuple(x.shape)}")
        if x.ndim < min_rank:
            raise self._fail(
                f"expects input of rank >= {min_rank} (batch, ...), got shape {tuple(x.shape)}; "
                "add a leading batch axis (x[None]) for a single example"
            )

    def _check_input_shape(self, input_shape: Shape, min_rank: int = 1) -> Shape:
        try:
            shape = tuple(int(d) for d in input_shape)
        except TypeError:
            raise self._fail(f"input_shape must be a tuple of ints, got {input_shape!r}") from None
        if len(shape) < min_rank or any(d <= 0 for d in shape):
            raise self._fail(
                f"expects an example shape of rank >= {min_rank} with positive sizes (no batch axis), got {shape}"
            )
        return shape

    def _check_no_params(self, params: Params) -> None:
        if params != ():
            raise self._fail(f"has no parameters and expects (), got {_describe(params)}")


def batch_sq_norms(per_example: Params, batch: int, dtype) -> Array:
    """``(batch,)`` sums of squares over every leaf of a per-example pytree (leaves have a leading batch axis)."""
    total = jnp.zeros((batch,), dtype)
    for leaf in jax.tree_util.tree_leaves(per_example):
        total = total + jnp.sum(leaf.reshape(batch, -1) ** 2, axis=1)
    return total


def shape_record(x: Array) -> Array:
    """A zero-size array of shape ``(0, *example_shape)``: it records ``x``'s example shape in a cache as data that
    crosses ``jit`` and ``custom_vjp`` boundaries, at no memory cost."""
    return jnp.zeros((0,) + x.shape[1:], x.dtype)


def positive_int(value: Any, name: str, owner: str) -> None:
    """Refuse a size that is not a positive ``int`` (``bool`` is not a size) with a ``ValueError`` naming the layer."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def _describe(tree: Any) -> str:
    """A short structural description of a pytree: arrays as their shapes, cut at 240 characters."""
    text = str(jax.tree_util.tree_map(lambda leaf: tuple(getattr(leaf, "shape", ())) or type(leaf).__name__, tree))
    return text if len(text) <= 240 else text[:237] + "..."


@dataclass(frozen=True)
class Policy:
    """Mixed precision for a layer: parameters stay in their own dtype (float32), the products run in
    ``compute_dtype`` (``"bfloat16"`` or ``"float16"``) and accumulate in float32 (``preferred_element_type``);
    outputs are ``output_dtype`` (default: the compute dtype; float32 for the last layer so the loss is exact).
    Gradients come back in the parameters' dtype. Hashable, so layers holding it stay static arguments."""

    compute_dtype: str = "bfloat16"
    output_dtype: str | None = None

    def __post_init__(self):
        for name in (self.compute_dtype, self.output_dtype):
            if name is not None and not jnp.issubdtype(jnp.dtype(name), jnp.floating):
                raise ValueError(f"Policy dtypes must be floating, got {name!r}")


def _matmul(a: Array, b: Array, contract: tuple[int, int], accumulate) -> Array:
    """``a`` and ``b`` contracted over one axis each, accumulated in ``accumulate`` (``None``: the inputs' dtype)."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=accumulate)


@dataclass(frozen=True, repr=False)
class Dense(Layer):
    """Fully connected layer ``z = x @ W + b`` over the last axis.

    Forward, for ``x`` of shape ``(batch, n_in)`` (any leading axes are flattened into the batch)::

        z = x W + b                W: (n_in, n_out), b: (n_out,)

    Backward, from ``dz = dL/dz``. Each ``z_bj = sum_i x_bi W_ij + b_j`` so::

        dW = x^T dz                (sums the outer products x_b dz_b^T over the batch)
        db = sum_b dz_b            (dz.sum(0))
        dx = dz W^T

    In the column-vector notation of the derivation document (``z = W' x + b`` with ``W' = W^T``) these
    are ``dW' = dz x^T`` and ``dx = W'^T dz``; mnet keeps rows as examples throughout.

    Arguments:
        out_dim: number of output units ``n_out``.
        W_init: initializer name or callable for ``W`` (default ``"lecun_normal"``; see
            :mod:`mnet.initializers` for Glorot/Xavier, He/Kaiming, LeCun and normal).
        b_init: initializer for ``b`` (default zeros).
        use_bias: ``False`` drops ``b``; params are then ``{"W": W}``.
        policy: a :class:`Policy` for mixed precision (default: compute in the inputs' dtype).
    """

    out_dim: int
    W_init: Any = "lecun_normal"
    b_init: Any = "zeros"
    use_bias: bool = True
    policy: Policy | None = None

    def __post_init__(self):
        positive_int(self.out_dim, "out_dim", "Dense")
        initializers.get(self.W_init), initializers.get(self.b_init)

    def __repr__(self) -> str:
        return f"Dense({self.out_dim})"

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        shape = self._check_input_shape(input_shape)
        dtype = default_float_dtype() if dtype is None else dtype
        key_W, key_b = jax.random.split(key)
        params = {"W": initializers.get(self.W_init)(key_W, (shape[-1], self.out_dim), dtype)}
        if self.use_bias:
            params["b"] = initializers.get(self.b_init)(key_b, (self.out_dim,), dtype)
        return shape[:-1] + (self.out_dim,), params

    def _check_params(self, params: Params, x: Array) -> None:
        expected = {"W", "b"} if self.use_bias else {"W"}
        if not isinstance(params, dict) or set(params) != expected:
            raise self._fail(f"expects params with keys {sorted(expected)}, got {_describe(params)}")
        W = params["W"]
        if W.ndim != 2 or W.shape[1] != self.out_dim:
            raise self._fail(f"expects W of shape (n_in, {self.out_dim}), got {tuple(W.shape)}")
        if self.use_bias and tuple(params["b"].shape) != (self.out_dim,):
            raise self._fail(f"expects b of shape ({self.out_dim},), got {tuple(params['b'].shape)}")
        if x.shape[-1] != W.shape[0]:
            raise self._fail(
                f"expects input width {W.shape[0]} (W is {tuple(W.shape)}), got input of shape {tuple(x.shape)}"
            )

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        self._check_input(x)
        self._check_params(params, x)
        if self.policy is None:
            z = x @ params["W"]
            return (z + params["b"] if self.use_bias else z), x
        compute, param_dtype = jnp.dtype(self.policy.compute_dtype), params["W"].dtype
        x = x.astype(compute)  # cached in the compute dtype: half the memory
        z = _matmul(x, params["W"].astype(compute), (x.ndim - 1, 0), param_dtype)
        if self.use_bias:
            z = z + params["b"]
        return z.astype(self.policy.output_dtype or compute), x

    def backward(self, params: Params, x: Cache, dz: Array) -> tuple[Params, Array]:
        n_in = x.shape[-1]
        W = params["W"]
        if self.policy is not None:
            accumulate, compute = W.dtype, jnp.dtype(self.policy.compute_dtype)
            W, dz = W.astype(compute), dz.astype(compute)
        else:
            accumulate = None
        x_rows, dz_rows = x.reshape(-1, n_in), dz.reshape(-1, self.out_dim)
        grads = {"W": _matmul(x_rows, dz_rows, (0, 0), accumulate)}
        if self.use_bias:
            grads["b"] = dz_rows.sum(axis=0, dtype=accumulate)
        dx = _matmul(dz, W, (dz.ndim - 1, 1), accumulate)
        return grads, dx if accumulate is None else dx.astype(x.dtype)

    def per_example_backward(self, params: Params, x: Cache, dz: Array) -> tuple[Params, Array]:
        """``dW_b = x_b dz_b^T`` (an outer product per example, all in one batched product) and ``db_b = dz_b``.
        With extra axes (a sequence), example ``b``'s gradient sums its positions: ``dW_b = X_b^T dZ_b``."""
        batch = x.shape[0]
        xs, dzs = x.reshape(batch, -1, x.shape[-1]), dz.reshape(batch, -1, self.out_dim)
        grads = {"W": jnp.einsum("bsi,bsj->bij", xs, dzs)}
        if self.use_bias:
            grads["b"] = dzs.sum(axis=1)
        return grads, dz @ params["W"].T

    def per_example_sq_norms(self, params: Params, x: Cache, dz: Array) -> tuple[Array, Array]:
        """Without building ``dW_b``: ``||x_b dz_b^T||_F^2 = ||x_b||^2 ||dz_b||^2`` and ``||db_b||^2 = ||dz_b||^2``
        (Goodfellow's trick). With ``s`` positions per example (a sequence, or a convolution's windows),
        ``||X_b^T dZ_b||_F^2 = <X_b X_b^T, dZ_b dZ_b^T>_F`` costs ``s^2 (n_in + n_out)`` against ``s n_in n_out``
        for building ``dW_b``; the cheaper of the two is used."""
        batch, n_in = x.shape[0], x.shape[-1]
        xs, dzs = x.reshape(batch, -1, n_in), dz.reshape(batch, -1, self.out_dim)
        positions = xs.shape[1]
        if positions == 1:
            dz_sq = jnp.sum(dzs[:, 0] ** 2, axis=1)
            sq = jnp.sum(xs[:, 0] ** 2, axis=1) * dz_sq
        elif positions * (n_in + self.out_dim) < n_in * self.out_dim:
            gram_x, gram_dz = jnp.einsum("bsi,bti->bst", xs, xs), jnp.einsum("bsj,btj->bst", dzs, dzs)
            sq = jnp.sum(gram_x * gram_dz, axis=(1, 2))
        else:
            sq = jnp.sum(jnp.einsum("bsi,bsj->bij", xs, dzs) ** 2, axis=(1, 2))
        if self.use_bias:
            sq = sq + jnp.sum(dzs.sum(axis=1) ** 2, axis=1)
        return sq, dz @ params["W"].T

    def ntk_contribution(self, params: Params, x1: Cache, x2: Cache, dzs1: Array, dzs2: Array) -> Array:
        """With ``D_k`` the cotangent at ``z`` for network output ``k``, example ``a``'s Jacobian of output ``k``
        is ``x_a D_k[a]^T`` for ``W`` and ``D_k[a]`` for ``b``, so the kernel is
        ``(x1 x2^T + 1) * sum_k D1_k D2_k^T``: no Jacobian is ever built. With positions (sequences, windows)
        the same sum runs over every pair of positions ``(s, t)``, unless the per-output Jacobians
        ``X_a^T D_k[a]`` are the smaller object, in which case they are built and contracted."""
        if x1.ndim == 2:
            g = jnp.einsum("kao,kco->ac", dzs1, dzs2)
            inputs = x1 @ x2.T
            return (inputs + 1) * g if self.use_bias else inputs * g
        b1, b2, n_in = x1.shape[0], x2.shape[0], x1.shape[-1]
        x1s, x2s = x1.reshape(b1, -1, n_in), x2.reshape(b2, -1, n_in)
        d1s, d2s = dzs1.reshape(-1, b1, x1s.shape[1], self.out_dim), dzs2.reshape(-1, b2, x2s.shape[1], self.out_dim)
        outputs, s, t = d1s.shape[0], x1s.shape[1], x2s.shape[1]
        pairwise_cost = b1 * b2 * s * t * (n_in + outputs * self.out_dim)
        jacobian_cost = outputs * n_in * self.out_dim * (b1 * s + b2 * t + b1 * b2)
        if pairwise_cost > jacobian_cost:
            j1, j2 = jnp.einsum("asi,kaso->kaio", x1s, d1s), jnp.einsum("csi,kcso->kcio", x2s, d2s)
            total = jnp.einsum("kaio,kcio->ac", j1, j2)
            if self.use_bias:
                total = total + jnp.einsum("kao,kco->ac", d1s.sum(axis=2), d2s.sum(axis=2))
            return total
        g = jnp.einsum("kaso,kcto->acst", d1s, d2s)
        inputs = jnp.einsum("asi,cti->acst", x1s, x2s)
        return jnp.sum((inputs + 1) * g if self.use_bias else inputs * g, axis=(2, 3))


class Elementwise(Layer):
    """A parameterless layer ``a = phi(z)`` applied entry by entry; ``da -> dz = da * phi'(z)``.

    Subclasses define ``activate(z) -> (a, cache)`` and ``activate_backward(cache, da) -> dz`` from the pairs
    in :mod:`mnet.activations`.
    """

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        return self._check_input_shape(input_shape), ()

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        self._check_input(x, min_rank=1)
        self._check_no_params(params)
        return self.activate(x)

    def backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        return (), self.activate_backward(cache, dy)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass(frozen=True, repr=False)
class Identity(Elementwise):
    """``a = z``; ``dz = da``."""

    def activate(self, z):
        return activations.identity(z)

    def activate_backward(self, cache, da):
        return activations.identity_backward(cache, da)


@dataclass(frozen=True, repr=False)
class Relu(Elementwise):
    """``a = max(z, 0)``; ``dz = da * [z > 0]`` (caches the mask)."""

    def activate(self, z):
        return activations.relu(z)

    def activate_backward(self, mask, da):
        return activations.relu_backward(mask, da)


@dataclass(frozen=True, repr=False)
class LeakyRelu(Elementwise):
    """``a = z`` if ``z >= 0`` else ``slope * z``; ``dz = da`` or ``slope * da`` (caches the mask)."""

    slope: float = 0.01

    def __repr__(self) -> str:
        return f"LeakyRelu(slope={self.slope})"

    def activate(self, z):
        return activations.leaky_relu(z, self.slope)

    def activate_backward(self, mask, da):
        return activations.leaky_relu_backward(mask, da, self.slope)


@dataclass(frozen=True, repr=False)
class Elu(Elementwise):
    """``a = z`` if ``z > 0`` else ``alpha (e^z - 1)``; ``dz = da`` or ``da * alpha e^z`` (caches ``z``)."""

    alpha: float = 1.0

    def __repr__(self) -> str:
        return f"Elu(alpha={self.alpha})"

    def activate(self, z):
        return activations.elu(z, self.alpha)

    def activate_backward(self, z, da):
        return activations.elu_backward(z, da, self.alpha)


@dataclass(frozen=True, repr=False)
class Sigmoid(Elementwise):
    """``a = 1 / (1 + e^-z)``; ``dz = da * a (1 - a)`` (caches ``a``)."""

    def activate(self, z):
        return activations.sigmoid(z)

    def activate_backward(self, a, da):
        return activations.sigmoid_backward(a, da)


@dataclass(frozen=True, repr=False)
class Tanh(Elementwise):
    """``a = tanh z``; ``dz = da * (1 - a^2)`` (caches ``a``)."""

    def activate(self, z):
        return activations.tanh(z)

    def activate_backward(self, a, da):
        return activations.tanh_backward(a, da)


@dataclass(frozen=True, repr=False)
class Softplus(Elementwise):
    """``a = log(1 + e^z)``; ``dz = da * sigmoid(z)`` (caches ``z``)."""

    def activate(self, z):
        return activations.softplus(z)

    def activate_backward(self, z, da):
        return activations.softplus_backward(z, da)


@dataclass(frozen=True, repr=False)
class Gelu(Elementwise):
    """``a = z Phi(z)``; ``dz = da * (Phi(z) + z phi(z))`` (caches ``z``).

    ``approximate=False`` (default) is the exact erf form, as PyTorch's default; note that
    ``jax.nn.gelu`` defaults to the tanh approximation, which ``Gelu(approximate=True)`` gives.
    """

    approximate: bool = False

    def __repr__(self) -> str:
        return f"Gelu(approximate={self.approximate})" if self.approximate else "Gelu()"

    def activate(self, z):
        return activations.gelu(z, self.approximate)

    def activate_backward(self, z, da):
        return activations.gelu_backward(z, da, self.approximate)


@dataclass(frozen=True, repr=False)
class Softmax(Elementwise):
    """``p = softmax(z)`` over the last axis; ``dz = p * (dp - sum(dp * p))`` (caches ``p``).

    Not elementwise in the strict sense (each output depends on the whole row), but parameterless and
    shape-preserving alike; its backward is the Jacobian-vector product of ``diag(p) - p p^T`` computed in
    O(n) without building the Jacobian. To train a classifier, prefer a linear last layer with
    ``losses.softmax_cross_entropy``, which fuses the two and is stable for any logits.
    """

    def activate(self, z):
        return activations.softmax(z)

    def activate_backward(self, p, dp):
        return activations.softmax_backward(p, dp)


@dataclass(frozen=True, repr=False)
class Flatten(Layer):
    """``(batch, d1, ..., dk) -> (batch, d1 * ... * dk)``; ``dx = dy`` reshaped back.

    The cache is the input's :func:`shape_record`.
    """

    def __repr__(self) -> str:
        return "Flatten()"

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        shape = self._check_input_shape(input_shape)
        return (math.prod(shape),), ()

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        self._check_input(x)
        self._check_no_params(params)
        return x.reshape(x.shape[0], -1), shape_record(x)

    def backward(self, params: Params, record: Cache, dy: Array) -> tuple[Params, Array]:
        return (), dy.reshape((dy.shape[0],) + record.shape[1:])


@dataclass(frozen=True, repr=False)
class Reshape(Layer):
    """``(batch, *in_shape) -> (batch, *shape)`` with the same entries in the same (row-major) order; ``dx = dy``
    reshaped back. ``Reshape((8, 8, 1))`` turns the 64 flat digit features into an NHWC image.

    Arguments:
        shape: the example shape to produce; its size must equal the input's.
    """

    shape: tuple[int, ...]

    def __post_init__(self):
        shape = tuple(self.shape) if isinstance(self.shape, (tuple, list)) else None
        if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise ValueError(f"Reshape: shape must be a tuple of positive ints, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)

    def __repr__(self) -> str:
        return f"Reshape({self.shape})"

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        shape = self._check_input_shape(input_shape)
        if math.prod(shape) != math.prod(self.shape):
            raise self._fail(f"cannot reshape examples of shape {shape} ({math.prod(shape)} entries) to {self.shape} "
                             f"({math.prod(self.shape)} entries)")
        return self.shape, ()

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        self._check_input(x)
        self._check_no_params(params)
        if math.prod(x.shape[1:]) != math.prod(self.shape):
            raise self._fail(f"cannot reshape input of shape {tuple(x.shape)} to (batch, {', '.join(map(str, self.shape))})")
        return x.reshape((x.shape[0],) + self.shape), shape_record(x)

    backward = Flatten.backward  # the same rule: dy reshaped back to the recorded example shape




ACTIVATIONS_BY_NAME: dict[str, type[Elementwise]] = {
    "relu": Relu,
    "leaky_relu": LeakyRelu,
    "elu": Elu,
    "gelu": Gelu,
    "sigmoid": Sigmoid,
    "tanh": Tanh,
    "softplus": Softplus,
    "identity": Identity,
}


@dataclass(frozen=True, repr=False)
class LayerNorm(Layer):
    """Normalise each example over its last axis, then scale and shift: ``y = gamma * xhat + beta``.

    Forward, per row of ``n`` features::

        mu = mean(x),  var = mean((x - mu)^2),  r = 1 / sqrt(var + eps),  xhat = (x - mu) r

    Backward: ``dgamma = sum(dy * xhat)`` and ``dbeta = sum(dy)`` over every row; with ``g = dy * gamma`` the
    closed form of the normalisation's Jacobian-vector product is ::

        dx = r * (g - mean(g) - xhat * mean(g * xhat))

    (the two means remove the components along the directions that normalisation itself removed: the constant
    vector and ``xhat``). Cache: ``xhat`` and ``r``.

    Arguments:
        eps: added to the variance (default 1e-5, as PyTorch).
    """

    eps: float = 1e-5

    def __repr__(self) -> str:
        return "LayerNorm()" if self.eps == 1e-5 else f"LayerNorm(eps={self.eps})"

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        shape = self._check_input_shape(input_shape)
        dtype = default_float_dtype() if dtype is None else dtype
        return shape, {"gamma": jnp.ones(shape[-1:], dtype), "beta": jnp.zeros(shape[-1:], dtype)}

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        self._check_input(x)
        if not isinstance(params, dict) or set(params) != {"gamma", "beta"}:
            raise self._fail(f"expects params with keys ['beta', 'gamma'], got {_describe(params)}")
        if params["gamma"].shape != x.shape[-1:]:
            raise self._fail(f"expects input width {params['gamma'].shape[0]}, got input of shape {tuple(x.shape)}")
        centred = x - jnp.mean(x, axis=-1, keepdims=True)
        rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        xhat = centred * rstd
        return params["gamma"] * xhat + params["beta"], (xhat, rstd)

    def backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        xhat, rstd = cache
        n = xhat.shape[-1]
        grads = {"gamma": jnp.sum((dy * xhat).reshape(-1, n), axis=0), "beta": jnp.sum(dy.reshape(-1, n), axis=0)}
        return grads, self._dx(params, xhat, rstd, dy)

    def _dx(self, params: Params, xhat: Array, rstd: Array, dy: Array) -> Array:
        g = dy * params["gamma"]
        return rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))

    def per_example_backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        """Example ``b``'s own ``dgamma_b = sum(dy_b * xhat_b)``, ``dbeta_b = sum(dy_b)`` over its positions."""
        xhat, rstd = cache
        batch, n = dy.shape[0], xhat.shape[-1]
        grads = {"gamma": jnp.sum((dy * xhat).reshape(batch, -1, n), axis=1),
                 "beta": jnp.sum(dy.reshape(batch, -1, n), axis=1)}
        return grads, self._dx(params, xhat, rstd, dy)


@dataclass(frozen=True, repr=False)
class Dropout(Layer):
    """Inverted dropout: while training, each entry is zeroed with probability ``rate`` and the survivors are
    scaled by ``1 / (1 - rate)`` so that the expected output equals the input; at evaluation it is the identity.

    ``rate`` is the probability of DROPPING an entry (as PyTorch's ``p`` and Keras's ``rate``), not of keeping
    it: ``Dropout(0.1)`` keeps 90%. (Some libraries' ``keep_prob`` or a reversed ``rate`` have confused this.)

    Forward ``y = x * m`` with ``m = bernoulli(1 - rate) / (1 - rate)``; backward ``dx = dy * m``: the same
    mask, which is the cache (the scalar 1 when not training).

    Randomness is explicit: ``forward(params, x, key=key, train=True)``; training without a key is an error.
    """

    rate: float = 0.5
    stochastic = True

    def __post_init__(self):
        if not 0 <= self.rate < 1:
            raise ValueError(f"Dropout: rate is the probability of dropping and must be in [0, 1), got {self.rate!r}")

    def __repr__(self) -> str:
        return f"Dropout({self.rate})"

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        return self._check_input_shape(input_shape), ()

    def forward(self, params: Params, x: Array, *, key: Array | None = None, train: bool = False) -> tuple[Array, Cache]:
        self._check_input(x, min_rank=1)
        self._check_no_params(params)
        if not train or self.rate == 0:
            return x, jnp.ones((), x.dtype)
        if key is None:
            raise self._fail("training (train=True) needs an explicit key=jax.random.key(...)")
        keep = jax.random.bernoulli(key, 1 - self.rate, x.shape)
        mask = keep.astype(x.dtype) / (1 - self.rate)
        return x * mask, mask

    def backward(self, params: Params, mask: Cache, dy: Array) -> tuple[Params, Array]:
        return (), dy * mask
