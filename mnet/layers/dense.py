"""The dense layer ``z = x W + b`` and the mixed-precision policy its products follow."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp

from mnet import initializers
from mnet.core.curvature import Columns, Curvature, Group, WeightedRows, next_origin, signed_square_sum
from mnet.core.layer import Layer, describe, positive_int
from mnet.core.protocol import Array, Cache, Params, Shape, default_float_dtype
from mnet.core.sums import factored_preconditioned_gradient, kept_weights, rotated_gradient_squares, sum_stack
from mnet.errors import SettingError


@dataclass(frozen=True)
class Policy:
    """Mixed precision for a layer: parameters stay in their own dtype (float32), the products run in
    ``compute_dtype`` (``"bfloat16"`` or ``"float16"``) and accumulate in float32 (``preferred_element_type``);
    outputs are ``output_dtype`` (default: the compute dtype; float32 for the last layer so the loss is exact).
    Gradients come back in the parameters' dtype, input gradients in the compute dtype. Hashable, so layers
    holding it stay static arguments."""

    compute_dtype: str = "bfloat16"
    output_dtype: str | None = None

    def __post_init__(self):
        for name in (self.compute_dtype, self.output_dtype):
            if name is not None and not jnp.issubdtype(jnp.dtype(name), jnp.floating):
                raise SettingError(f"Policy dtypes must be floating, got {name!r}")


def matmul(a: Array, b: Array, contract: tuple[int, int], accumulate) -> Array:
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

    Per example (index conventions: ``b`` example, ``s`` position within an example, ``i`` input, ``j`` output)::

        dW_b = sum_s x_bs dz_bs^T        db_b = sum_s dz_bs
        ||dW_b||^2 = ||x_b||^2 ||dz_b||^2                      (one position: Goodfellow's trick)
                   = <X_b X_b^T, dZ_b dZ_b^T>_F                (s positions: the Gram form, when cheaper)

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
            raise self._fail(f"expects params with keys {sorted(expected)}, got {describe(params)}")
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
        x = x.astype(jnp.dtype(self.policy.compute_dtype))  # cached in the compute dtype: half the memory
        z = self._product(x, params["W"])
        if self.use_bias:
            z = z + params["b"]
        return self._output(z), x

    def _product(self, a: Array, W: Array) -> Array:
        """``a W`` as the forward computes it: under a policy, in the compute dtype accumulated in W's dtype."""
        if self.policy is None:
            return a @ W
        compute = jnp.dtype(self.policy.compute_dtype)
        return matmul(a.astype(compute), W.astype(compute), (a.ndim - 1, 0), W.dtype)

    def _output(self, z: Array) -> Array:
        return z if self.policy is None else z.astype(self.policy.output_dtype or jnp.dtype(self.policy.compute_dtype))

    def tangent(self, params: Params, x: Cache, dparams: Params, dx: Array | None) -> Array:
        """Forward mode: ``z = x W + b`` is bilinear in ``(x, W)``, so ``dz = dx W + x dW + db`` (no ``dx W`` for
        a constant input)."""
        dz = self._product(x, dparams["W"])
        if dx is not None:
            dz = dz + self._product(dx, params["W"])
        if self.use_bias:
            dz = dz + dparams["b"]
        return self._output(dz)

    def backward_tangent(
        self, params: Params, x: Cache, tangents: tuple, dz: Array, dz_tangent: Array
    ) -> tuple[Params, Array, Array]:
        """The backward pass differentiated along the tangent (Pearlmutter's R-operator). From ``dW = x^T dz``,
        ``db = sum dz`` and ``dx = dz W^T``, with ``R{x} = dx_t`` (the input's tangent), ``R{W} = dW_t`` and
        ``R{dz}`` the tangent of the cotangent::

            R{dW} = dx_t^T dz + x^T R{dz}      R{db} = sum R{dz}      R{dx} = R{dz} W^T + dz dW_t^T

        The two cross terms are where the Hessian differs from the Gauss-Newton matrix at a dense layer.
        Returns ``(R{dparams}, dx, R{dx})``."""
        dparams, dx_tangent = tangents
        hv, down_tangent = self.backward(params, x, dz_tangent)
        W, dz_compute, accumulate = self._operands(params, dz)
        down = self._input_gradient(W, dz_compute, accumulate, x)
        W_t = self._operands(dparams, dz)[0]
        down_tangent = down_tangent + self._input_gradient(W_t, dz_compute, accumulate, x)
        if dx_tangent is not None:
            rows = dx_tangent.reshape(-1, dx_tangent.shape[-1])
            hv["W"] = hv["W"] + matmul(rows, dz_compute.reshape(-1, self.out_dim), (0, 0), accumulate)
        return hv, down, down_tangent

    def _operands(self, params: Params, dz: Array) -> tuple[Array, Array, Any]:
        """``(W, dz, accumulate)`` as every backward rule multiplies them: in the policy's compute dtype with
        accumulation in the parameters' dtype, or as they come (``accumulate=None``)."""
        W = params["W"]
        if self.policy is None:
            return W, dz, None
        compute = jnp.dtype(self.policy.compute_dtype)
        return W.astype(compute), dz.astype(compute), W.dtype

    def _input_gradient(self, W: Array, dz: Array, accumulate, x: Array) -> Array:
        """``dx = dz W^T``, in the dtype of the cached input (the compute dtype under a policy)."""
        dx = matmul(dz, W, (dz.ndim - 1, 1), accumulate)
        return dx if accumulate is None else dx.astype(x.dtype)

    def backward(self, params: Params, x: Cache, dz: Array) -> tuple[Params, Array]:
        W, dz, accumulate = self._operands(params, dz)
        x_rows, dz_rows = x.reshape(-1, x.shape[-1]), dz.reshape(-1, self.out_dim)
        grads = {"W": matmul(x_rows, dz_rows, (0, 0), accumulate)}
        if self.use_bias:
            grads["b"] = dz_rows.sum(axis=0, dtype=accumulate)
        return grads, self._input_gradient(W, dz, accumulate, x)

    def _positions(self, x: Array, dz: Array) -> tuple[Array, Array]:
        """``(batch, s, n_in)`` and ``(batch, s, n_out)``: every example's positions (1 for flat inputs)."""
        batch = x.shape[0]
        return x.reshape(batch, -1, x.shape[-1]), dz.reshape(batch, -1, self.out_dim)

    def per_example_backward(self, params: Params, x: Cache, dz: Array) -> tuple[Params, Array]:
        """``dW_b = X_b^T dZ_b`` (an outer product per example for flat inputs), all in one batched product;
        ``db_b = sum_s dz_bs``."""
        W, dz, accumulate = self._operands(params, dz)
        xs, dzs = self._positions(x, dz)
        grads = {"W": jnp.einsum("bsi,bsj->bij", xs, dzs, preferred_element_type=accumulate)}
        if self.use_bias:
            grads["b"] = dzs.sum(axis=1, dtype=accumulate)
        return grads, self._input_gradient(W, dz, accumulate, x)

    def per_example_sq_norms(self, params: Params, x: Cache, dz: Array) -> tuple[Array, Array]:
        """Without building ``dW_b``: ``||x_b dz_b^T||_F^2 = ||x_b||^2 ||dz_b||^2`` and ``||db_b||^2 = ||dz_b||^2``
        (Goodfellow's trick). With ``s`` positions per example (a sequence, or a convolution's windows),
        ``||X_b^T dZ_b||_F^2 = <X_b X_b^T, dZ_b dZ_b^T>_F`` costs ``s^2 (n_in + n_out)`` against ``s n_in n_out``
        for building ``dW_b``; the cheaper of the two is used. Under a policy the sums run in the parameters'
        dtype."""
        W, dz_compute, accumulate = self._operands(params, dz)
        norm_dtype = accumulate or dz.dtype
        xs, dzs = (a.astype(norm_dtype) for a in self._positions(x, dz_compute))
        n_in, positions = xs.shape[-1], xs.shape[1]
        if positions == 1:
            sq = jnp.sum(xs[:, 0] ** 2, axis=1) * jnp.sum(dzs[:, 0] ** 2, axis=1)
        elif positions * (n_in + self.out_dim) < n_in * self.out_dim:
            gram_x, gram_dz = jnp.einsum("bsi,bti->bst", xs, xs), jnp.einsum("bsj,btj->bst", dzs, dzs)
            sq = jnp.sum(gram_x * gram_dz, axis=(1, 2))
        else:
            sq = jnp.sum(jnp.einsum("bsi,bsj->bij", xs, dzs) ** 2, axis=(1, 2))
        if self.use_bias:
            sq = sq + jnp.sum(dzs.sum(axis=1) ** 2, axis=1)
        return sq, self._input_gradient(W, dz_compute, accumulate, x)

    def _curvature_operands(self, params: Params, x: Cache, S: Array) -> tuple[Array, Array]:
        """``(batch, s, n_in)`` inputs and ``(C, batch, s, n_out)`` square-root columns, in the parameters' dtype."""
        xs = self._curvature_inputs(params, x)
        return xs, S.reshape(S.shape[0], x.shape[0], xs.shape[1], self.out_dim).astype(xs.dtype)

    def _curvature_inputs(self, params: Params, x: Cache) -> Array:
        """``(batch, s, n_in)``: every example's positions (1 for flat inputs), in the parameters' dtype."""
        return x.reshape(x.shape[0], -1, x.shape[-1]).astype(params["W"].dtype)

    def _with_bias_column(self, inputs: Array) -> Array:
        """``[x, 1]`` along the last axis with a bias, ``x`` without: the rows the Kronecker factor ``A`` and the
        stacked matrix ``[W; b]`` act on."""
        if not self.use_bias:
            return inputs
        return jnp.concatenate([inputs, jnp.ones(inputs.shape[:-1] + (1,), inputs.dtype)], axis=-1)

    def per_example_diag_ggn(self, params: Params, x: Cache, S: Array) -> Params:
        """``diag(J_b^T H_b J_b)`` for ``W`` and ``b``, from the columns ``S[c]`` reaching ``z``. Column ``c``'s
        per-example gradient is ``x_b S[c, b]^T``, so its square summed over ``c`` is ``x_b^2 (sum_c S[c, b]^2)^T``:
        one outer product of squares per example, never a per-column gradient. With positions, example ``b``'s
        column gradient ``X_b^T S[c, b]`` sums over them before squaring, and is built."""
        xs, Ss = self._curvature_operands(params, x, S)
        if xs.shape[1] == 1:
            columns_sq = sum_stack(Ss[:, :, 0] ** 2)
            diag = {"W": jnp.einsum("bi,bj->bij", xs[:, 0] ** 2, columns_sq)}
            if self.use_bias:
                diag["b"] = columns_sq
            return diag
        # The columns beside the outputs ("bicj"): one batched product per example with the columns folded into
        # its output width; "cbij" made XLA's CPU loop over the columns (the CNN's second convolution: 14 ms
        # against 26 ms).
        diag = {"W": jnp.sum(jnp.einsum("bsi,cbsj->bicj", xs, Ss) ** 2, axis=2)}
        if self.use_bias:
            diag["b"] = sum_stack(jnp.sum(Ss, axis=2) ** 2)
        return diag

    def diag_ggn(self, params: Params, x: Cache, S: Array) -> Params:
        """The batch sum of :meth:`per_example_diag_ggn`; for flat inputs one product of squares,
        ``(x^2)^T (sum_c S[c]^2)``, with no per-example array at all."""
        xs, Ss = self._curvature_operands(params, x, S)
        if xs.shape[1] > 1:
            return jax.tree_util.tree_map(sum_stack, self.per_example_diag_ggn(params, x, S))
        columns_sq = sum_stack(Ss[:, :, 0] ** 2)
        diag = {"W": (xs[:, 0] ** 2).T @ columns_sq}
        if self.use_bias:
            diag["b"] = jnp.sum(columns_sq, axis=0)
        return diag

    def kronecker_factors(self, params: Params, x: Cache, S: Array, kept: Array | None = None) -> Params:
        """``z = a W'`` with ``a = [x, 1]`` and ``W' = [W; b]``, so example ``b``'s GGN block for ``W'`` (row-major)
        is ``sum_c (a_b a_b^T) kron (S[c, b] S[c, b]^T)``: at batch 1 exactly ``kron(A, G)``. Over a batch K-FAC
        takes the mean of each factor, ``A = mean_b a_b a_b^T`` and ``G = mean_b sum_c S[c, b] S[c, b]^T``.
        With positions (a sequence, a convolution's windows) every position counts as an example in both means
        (K-FAC "expand", Eschenhagen et al. 2023): the block is then approximated by ``P kron(A, G)`` for ``P``
        positions, the factor that the cross-position terms, which a Kronecker product cannot hold, leave out.
        Under a padding mask (``kept``) the means run over the kept positions only."""
        xs, Ss = self._curvature_operands(params, x, S)
        xs = self._with_bias_column(xs)
        weights = kept_weights(kept, xs.shape[0], xs.shape[1], xs.dtype, self)[..., None]
        kept_xs, kept_Ss = (xs, Ss) if kept is None else (xs * weights, Ss * weights)
        rows = jnp.maximum(jnp.sum(weights), 1)
        return {
            "A": jnp.einsum("bsi,bsj->ij", kept_xs, xs) / rows,
            "G": jnp.einsum("cbsi,cbsj->ij", kept_Ss, Ss) / rows,
        }

    def eigen_correction(self, params: Params, x: Cache, S: Array, basis: Params) -> Array:
        """EK-FAC's eigenvalues for ``W' = [W; b]`` in the eigenbasis ``kron(Q_A, Q_G)`` of its factors
        (``basis = {"A": Q_A, "G": Q_G}``): column ``c``'s gradient for example ``b`` is ``A_b^T S[c, b]``
        (``A_b = [X_b, 1]``, its positions as rows), so in the basis it is ``(A_b Q_A)^T (S[c, b] Q_G)``, the
        operands rotated before the product; ``mean_b sum_c`` of its squares is the exact diagonal of the layer's
        GGN block in that basis (:func:`mnet.core.sums.rotated_gradient_squares`)."""
        xs, Ss = self._curvature_operands(params, x, S)
        xs = self._with_bias_column(xs)
        return rotated_gradient_squares(xs @ basis["A"].astype(xs.dtype), Ss @ basis["G"].astype(xs.dtype))

    def kronecker_direction(self, params: Params, x: Cache, dz: Array, inverses: Params) -> tuple[Array, Array] | None:
        """K-FAC's direction ``D = A^-1 dW' G^-1`` for ``W' = [W; b]`` (``inverses = {"A": A^-1, "G": G^-1}``)
        from the operands of the gradient ``dW' = [X, 1]^T dZ`` (positions as rows), never the gradient itself:
        ``([X, 1] A^-1)^T (dZ G^-1)``, both inverses symmetric; with it ``<D, dW'>``. Exact for any inverses; None
        where the dense form is the cheaper (:func:`mnet.core.sums.factored_preconditioned_gradient`)."""
        dtype = params["W"].dtype
        rows = self._with_bias_column(x.reshape(-1, x.shape[-1]).astype(dtype))
        return factored_preconditioned_gradient(
            rows, dz.reshape(-1, self.out_dim).astype(dtype), inverses["A"], inverses["G"]
        )

    def diag_hessian(self, params: Params, x: Cache, curvature: Curvature) -> tuple[Params, Curvature]:
        """The Hessian diagonal for ``W`` and ``b`` from the Hessian at ``z`` (:mod:`mnet.core.curvature`).
        ``z`` is linear in ``W``, so ``d^2 L / dW_ij^2 = sum_b x_bi^2 (H_z_b)_jj``: the diagonals of the column sets
        and the diagonal part make ``diag(H_z_b)``, and one product of squares gives the share. With positions
        (windows, sequences) each column's gradient ``X_b^T c`` sums over them before squaring, and the diagonal
        part gives ``sum_s x_bsi^2 d_bsj``. ``z`` is linear in ``x`` too, so the input's Hessian is ``W H_z W^T``:
        columns times ``W^T``; the diagonal part is passed on factored (:class:`WeightedRows`), or for positions
        as the columns ``sqrt|d_sj| W[:, j]`` at position ``s`` (a broadcast, no product)."""
        W = params["W"]
        xs = self._curvature_inputs(params, x)
        batch, positions = xs.shape[:2]
        d = None if curvature.diag is None else curvature.diag.reshape(batch, positions, self.out_dim).astype(W.dtype)
        below = replace(curvature, diag=None).through(lambda dz: dz @ W.T.astype(dz.dtype))
        if positions == 1:
            h = sum(
                (group.diagonal().reshape(batch, self.out_dim).astype(W.dtype) for group in curvature.groups),
                jnp.zeros((batch, self.out_dim), W.dtype) if d is None else d[:, 0],
            )
            share = {"W": (xs[:, 0] ** 2).T @ h}
            if self.use_bias:
                share["b"] = jnp.sum(h, axis=0)
            if d is None:
                return share, below
            part: Group = WeightedRows(next_origin(), W, d[:, 0].astype(below.grad.dtype))
            if x.ndim != 2:
                part = part.materialized().scaled(lambda v: v.reshape(x.shape))
            return share, replace(below, groups=below.groups + (part,))

        def squares(columns: Array) -> Params:
            cs = columns.reshape(columns.shape[0], batch, positions, self.out_dim).astype(W.dtype)
            per = {"W": jnp.einsum("bsi,kbsj->kbij", xs, cs) ** 2}
            if self.use_bias:
                per["b"] = jnp.sum(cs, axis=2) ** 2
            return per

        share = jax.tree_util.tree_map(lambda v: jnp.sum(v, axis=0), signed_square_sum(curvature.columns(), squares))
        if d is None:
            return share, below
        share["W"] = share["W"] + jnp.einsum("bsi,bsj->ij", xs**2, d)
        if self.use_bias:
            share["b"] = share["b"] + jnp.sum(d, axis=(0, 1))
        columns = jnp.einsum("bpj,ij,pq->pjbqi", jnp.sqrt(jnp.abs(d)), W, jnp.eye(positions, dtype=W.dtype))
        signs = jnp.moveaxis(jnp.sign(d), 0, 2).reshape(positions * self.out_dim, batch)
        part = Columns(
            next_origin(), columns.reshape((positions * self.out_dim,) + x.shape).astype(below.grad.dtype), signs
        )
        return share, replace(below, groups=below.groups + (part,))

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
