"""Token embedding: a table lookup forward, a scatter-add backward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnet import initializers
from mnet.core.layer import Layer, describe, positive_int
from mnet.core.protocol import Array, Cache, Params, Shape, default_float_dtype
from mnet.core.sums import batch_sq_norms, kept_weights, rotated_gradient_squares


@dataclass(frozen=True, repr=False)
class Embedding(Layer):
    """Integer ids ``(batch, *positions)`` to vectors ``(batch, *positions, dim)`` by looking up rows of a table.

    Forward: ``y[b, s] = W[ids[b, s]]``, ``W: (vocab, dim)``. In matrix form this is a dense layer without bias
    on one-hot inputs, ``Y = onehot(ids) W``, computed as a gather instead of a product with a mostly-zero matrix.

    Backward: ``dW = onehot(ids)^T dY``: every row ``dY[b, s]`` is added into row ``ids[b, s]`` of a zero table,
    a scatter-add (ids that repeat accumulate). The ids are integers, so there is no input gradient: ``dx`` is
    an array of ``jax.dtypes.float0`` zeros, what ``jax.vjp`` gives for integer inputs too.

    Per example: ``dW_b`` scatters only example ``b``'s rows; its squared norm without building it is
    ``||dW_b||^2 = sum_{s,t} [ids_bs = ids_bt] <dY_bs, dY_bt>`` (the one-hot Gram matrix is the equality
    pattern of the ids), used when the positions are few compared with the vocabulary. The NTK term is likewise
    ``sum_k sum_{s,t} [ids1_as = ids2_ct] <D1_k[a, s], D2_k[c, t]>``.

    Ids outside ``[0, vocab)`` are an error when the ids are concrete; inside ``jit`` they look up NaN rows (and
    their gradient is dropped), so that they cannot pass silently.

    Arguments:
        vocab: number of distinct ids.
        dim: width of each embedding vector.
        W_init: initializer for the table (default ``normal(1.0)``: unit-variance entries).
        max_length: the longest sequence (axis 1 of the ids) the layer accepts (a model's context), or None.
    """

    curvature_free = True  # a lookup, linear in the table; its integer input has no curvature

    vocab: int
    dim: int
    W_init: Any = initializers.Normal(1.0)
    max_length: int | None = None

    def __post_init__(self):
        for name in ("vocab", "dim"):
            positive_int(getattr(self, name), name, "Embedding")
        if self.max_length is not None:
            positive_int(self.max_length, "max_length", "Embedding")
        initializers.get(self.W_init)

    def __repr__(self) -> str:
        extra = "" if self.max_length is None else f", max_length={self.max_length}"
        return f"Embedding({self.vocab}, {self.dim}{extra})"

    def _check_length(self, shape: tuple, what: str) -> None:
        if self.max_length is not None and len(shape) >= 1 and shape[0] > self.max_length:
            raise self._fail(
                f"{what} holds sequences of {shape[0]} positions, longer than the context of {self.max_length}"
            )

    @property
    def input_vocab(self) -> int:
        """The layer takes integer ids in ``[0, vocab)`` (what :func:`mnet.check_layer` draws as inputs)."""
        return self.vocab

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        shape = self._check_input_shape(input_shape, min_rank=0)
        self._check_length(shape, f"the example shape {shape}")
        dtype = default_float_dtype() if dtype is None else dtype
        return shape + (self.dim,), {"W": initializers.get(self.W_init)(key, (self.vocab, self.dim), dtype)}

    def _check(self, params: Params, ids: Array) -> None:
        if not hasattr(ids, "dtype") or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise self._fail(
                f"expects integer ids, got {getattr(ids, 'dtype', type(ids).__name__)} "
                f"with shape {tuple(getattr(ids, 'shape', ()))}"
            )
        if ids.ndim < 1:
            raise self._fail("expects ids of shape (batch, ...), got a scalar")
        self._check_length(tuple(ids.shape[1:]), f"ids of shape {tuple(ids.shape)}")
        if not isinstance(params, dict) or set(params) != {"W"}:
            raise self._fail(f"expects params with key ['W'], got {describe(params)}")
        if tuple(params["W"].shape) != (self.vocab, self.dim):
            raise self._fail(f"expects W of shape ({self.vocab}, {self.dim}), got {tuple(params['W'].shape)}")
        if not isinstance(ids, jax.core.Tracer) and ids.size:
            concrete = np.asarray(ids)  # host-side, so that the check also works on a constant inside jit
            low, high = int(concrete.min()), int(concrete.max())
            if low < 0 or high >= self.vocab:
                raise self._fail(
                    f"ids must lie in [0, {self.vocab}), found {low if low < 0 else high} "
                    f"in ids of shape {tuple(ids.shape)}"
                )

    def forward(self, params: Params, ids: Array) -> tuple[Array, Cache]:
        self._check(params, ids)
        return jnp.take(params["W"], ids, axis=0, mode="fill", fill_value=jnp.nan), ids

    def tangent(self, params: Params, ids: Cache, dparams: Params, dx: Any) -> Array:
        """The lookup is linear in the table: ``dy = dW[ids]`` (integer ids have no tangent)."""
        return jnp.take(dparams["W"], ids, axis=0, mode="fill", fill_value=jnp.nan)

    def backward(self, params: Params, ids: Cache, dy: Array) -> tuple[Params, Any]:
        table = jnp.zeros((self.vocab, self.dim), dy.dtype)
        dW = table.at[ids.reshape(-1)].add(dy.reshape(-1, self.dim), mode="drop")
        return {"W": dW}, np.zeros(ids.shape, jax.dtypes.float0)

    def per_example_backward(self, params: Params, ids: Cache, dy: Array) -> tuple[Params, Any]:
        batch = ids.shape[0]
        rows = ids.reshape(batch, -1)
        examples = jnp.broadcast_to(jnp.arange(batch)[:, None], rows.shape)
        table = jnp.zeros((batch, self.vocab, self.dim), dy.dtype)
        dW = table.at[examples, rows].add(dy.reshape(batch, -1, self.dim), mode="drop")
        return {"W": dW}, np.zeros(ids.shape, jax.dtypes.float0)

    def per_example_sq_norms(self, params: Params, ids: Cache, dy: Array) -> tuple[Array, Any]:
        batch = ids.shape[0]
        rows, dys = ids.reshape(batch, -1), dy.reshape(batch, -1, self.dim)
        if rows.shape[1] ** 2 > self.vocab:
            grads, dx = self.per_example_backward(params, ids, dy)
            return batch_sq_norms(grads, batch, dy.dtype), dx
        same = rows[:, :, None] == rows[:, None, :]
        sq = jnp.sum(jnp.where(same, jnp.einsum("bsd,btd->bst", dys, dys), 0), axis=(1, 2))
        return sq, np.zeros(ids.shape, jax.dtypes.float0)

    def kronecker_factors(self, params: Params, ids: Cache, S: Array, kept: Array | None = None) -> Params:
        """As a dense layer on one-hot inputs (:meth:`mnet.Dense.kronecker_factors`, every position an example):
        ``A = mean_bs onehot(ids_bs) onehot(ids_bs)^T`` is diagonal, each id's frequency among the positions, and
        ``G = mean_bs sum_c S[c, b, s] S[c, b, s]^T``. ``A`` is returned as the dense ``(vocab, vocab)`` matrix K-FAC
        and Laplace expect (for a large vocabulary that is ``vocab^2`` floats); under a padding mask (``kept``)
        only the kept positions count."""
        dtype = params["W"].dtype
        rows = ids.reshape(ids.shape[0], -1)
        weights = kept_weights(kept, rows.shape[0], rows.shape[1], dtype, self)
        Ss = S.reshape(S.shape[0], rows.shape[0], rows.shape[1], self.dim).astype(dtype)
        kept_Ss = Ss if kept is None else Ss * weights[..., None]
        count = jnp.maximum(jnp.sum(weights), 1)
        frequencies = jnp.zeros(self.vocab, dtype).at[rows.reshape(-1)].add(weights.reshape(-1), mode="drop")
        return {"A": jnp.diag(frequencies) / count, "G": jnp.einsum("cbsi,cbsj->ij", kept_Ss, Ss) / count}

    def eigen_correction(self, params: Params, ids: Cache, S: Array, basis: Params) -> Array:
        """As a dense layer on one-hot inputs (:meth:`mnet.Dense.eigen_correction`): the rotated input at a position
        is the row ``Q_A[id]`` of the basis, so no one-hot is built; each example's rotated gradient
        ``sum_s Q_A[id_bs]^T (S[c, b, s] Q_G)`` is squared and averaged over the batch."""
        dtype = params["W"].dtype
        rows = ids.reshape(ids.shape[0], -1)
        Ss = S.reshape(S.shape[0], rows.shape[0], rows.shape[1], self.dim).astype(dtype)
        rotated_inputs = jnp.take(basis["A"].astype(dtype), rows, axis=0)
        return rotated_gradient_squares(rotated_inputs, Ss @ basis["G"].astype(dtype))

    def ntk_contribution(self, params: Params, ids1: Cache, ids2: Cache, dys1: Array, dys2: Array) -> Array:
        b1, b2 = ids1.shape[0], ids2.shape[0]
        rows1, rows2 = ids1.reshape(b1, -1), ids2.reshape(b2, -1)
        d1, d2 = dys1.reshape(-1, b1, rows1.shape[1], self.dim), dys2.reshape(-1, b2, rows2.shape[1], self.dim)
        same = rows1[:, None, :, None] == rows2[None, :, None, :]
        return jnp.sum(jnp.where(same, jnp.einsum("kasd,kctd->acst", d1, d2), 0), axis=(2, 3))
