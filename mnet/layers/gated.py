"""Gated linear units: the gated MLP of LLaMA-style decoders (SwiGLU, GeGLU), and the gate's product alone.

``GatedMLP`` computes ::

    y = (act(x W_gate + b_gate) * (x W_up + b_up)) W_down + b_down

(Shazeer 2020, "GLU variants improve Transformer"; SwiGLU with ``act = silu``, GeGLU with ``act = gelu``). It is the
network ``serial(parallel(Dense, Dense), GatedProduct(act), Dense)``, so every quantity walks through the two
input projections, the product and the output projection; the product is the only new rule, :class:`GatedProduct`.

With ``a`` the gate's pre-activation, ``b`` the up projection and ``y = phi(a) * b`` (elementwise)::

    forward          y = phi(a) b
    backward         da = dy b phi'(a),   db = dy phi(a)
    tangent          y_t = phi'(a) a_t b + phi(a) b_t
    backward_tangent R{da} = phi'(a) (R{dy} b + dy b_t) + phi''(a) a_t dy b,   R{db} = R{dy} phi(a) + dy phi'(a) a_t

Second order. Unit ``i`` of ``y`` depends on ``(a_i, b_i)`` alone, and the Hessian of ``g_i y_i`` (``g`` the gradient
reaching ``y``) with respect to that pair is ``[[g b phi'', g phi'], [g phi', 0]]``: a diagonal ``g b phi''`` on
``a`` plus the cross term ``m (e_a e_b^T + e_b e_a^T)``, ``m = g phi'``, which is the difference of two squares,
``m/2 (e_a + e_b)(e_a + e_b)^T - m/2 (e_a - e_b)(e_a - e_b)^T``: two signed columns per unit and position.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from mnet.core.curvature import Columns, Curvature, next_origin
from mnet.core.layer import Layer, check_param_keys, positive_int
from mnet.core.protocol import Array, Cache, Params, Shape, call_forward
from mnet.core.walk import Compound
from mnet.errors import LayerError, SettingError
from mnet.layers.combinators import Parallel, Serial
from mnet.layers.dense import Dense
from mnet.layers.elementwise import ACTIVATIONS_BY_NAME, Elementwise

GATE_ACTIVATIONS = ("silu", "gelu")


def _activation(name: str, owner: str) -> Elementwise:
    if name not in GATE_ACTIVATIONS:
        raise SettingError(f"{owner}: activation must be one of {list(GATE_ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS_BY_NAME[name]()


@dataclass(frozen=True, repr=False)
class GatedProduct(Layer):
    """``[a | b] -> phi(a) * b`` over the last axis (its two halves): the gate of a gated MLP, parameterless.
    The rules are in :mod:`mnet.layers.gated`'s docstring. Cache: ``phi``'s cache, ``phi(a)`` and ``b``.

    Arguments:
        activation: ``"silu"`` (SwiGLU) or ``"gelu"`` (GeGLU, the exact erf form).
    """

    activation: str = "silu"

    def __post_init__(self):
        _activation(self.activation, "GatedProduct")

    def __repr__(self) -> str:
        return f"GatedProduct({self.activation!r})"

    @property
    def _phi(self) -> Elementwise:
        return ACTIVATIONS_BY_NAME[self.activation]()

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        shape = self._check_input_shape(input_shape)
        if shape[-1] % 2:
            raise self._fail(f"expects an even last axis [gate | up], got example shape {shape}")
        return shape[:-1] + (shape[-1] // 2,), ()

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        self._check_input(x)
        self._check_no_params(params)
        if x.shape[-1] % 2:
            raise self._fail(f"expects an even last axis [gate | up], got input of shape {tuple(x.shape)}")
        a, b = jnp.split(x, 2, axis=-1)
        gate, phi_cache = self._phi.activate(a)
        return gate * b, (phi_cache, gate, b)

    def _slope(self, cache: Cache, v: Array) -> Array:
        """``phi'(a) v``."""
        return self._phi.activate_backward(cache[0], v)

    def _curve(self, cache: Cache) -> Array:
        """``phi''(a)`` (never zero for the gate's smooth activations)."""
        second = self._phi.activate_second(cache[0])
        assert second is not None
        return second

    def backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        _, gate, b = cache
        return (), jnp.concatenate([self._slope(cache, dy * b), dy * gate], axis=-1)

    def tangent(self, params: Params, cache: Cache, dparams: Params, dx: Array | None) -> Array | None:
        if dx is None:
            return None
        _, gate, b = cache
        a_t, b_t = jnp.split(dx, 2, axis=-1)
        return self._slope(cache, a_t) * b + gate * b_t

    def backward_tangent(
        self, params: Params, cache: Cache, tangents: tuple, dy: Array, dy_tangent: Array
    ) -> tuple[Params, Array, Array]:
        _, dx = self.backward(params, cache, dy)
        _, dx_tangent = self.backward(params, cache, dy_tangent)
        x_tangent = tangents[1]
        if x_tangent is None:
            return (), dx, dx_tangent
        b = cache[2]
        a_t, b_t = jnp.split(x_tangent, 2, axis=-1)
        da_extra = self._slope(cache, dy * b_t) + self._curve(cache) * a_t * dy * b
        db_extra = self._slope(cache, dy * a_t)
        return (), dx, dx_tangent + jnp.concatenate([da_extra, db_extra], axis=-1)

    def diag_hessian(self, params: Params, cache: Cache, curvature: Curvature) -> tuple[Params, Curvature]:
        """``J^T H_y J`` through :meth:`backward` (every set expanded into columns: ``J`` is not diagonal), plus
        this layer's own curvature (module docstring): ``g b phi''`` on the diagonal at ``a``, and the cross terms
        as two signed columns per unit, each nonzero at ``a_i`` and ``b_i`` only."""
        b = cache[2]
        g = curvature.grad
        below = curvature.through(lambda v: self.backward(params, cache, v)[1])
        own_diagonal = self._curve(cache) * g * b
        below = below.plus_diagonal(jnp.concatenate([own_diagonal, jnp.zeros_like(b)], axis=-1))
        m = self._slope(cache, g)
        batch, units = m.shape[0], m[0].size
        weight = jnp.sqrt(jnp.abs(m) / 2).reshape(batch, units)
        unit_columns = jnp.einsum("bj,jk->jbk", weight, jnp.eye(units, dtype=m.dtype)).reshape(
            (units, batch) + m.shape[1:]
        )
        plus = jnp.concatenate([unit_columns, unit_columns], axis=-1)
        minus = jnp.concatenate([unit_columns, -unit_columns], axis=-1)
        signs = jnp.sign(m).reshape(batch, units).T
        groups = (
            Columns(next_origin(), plus, signs),
            Columns(next_origin(), minus, -signs),
        )
        return (), Curvature(below.grad, below.groups + groups, below.diag)


@dataclass(frozen=True, repr=False)
class GatedMLP(Compound):
    """The gated MLP of LLaMA-style decoders, ``(..., d) -> (..., d)``::

        y = (act(x W_gate + b_gate) * (x W_up + b_up)) W_down + b_down

    SwiGLU for ``activation="silu"``, GeGLU for ``"gelu"`` (exact erf, as torch's default). The layer is the
    network ``serial(parallel(Dense(hidden), Dense(hidden)), GatedProduct(activation), Dense(d))`` with its params
    renamed, and every quantity walks through those parts (the product's rules: :mod:`mnet.layers.gated`).

    Params: ``{"W_gate": (d, hidden), "W_up": (d, hidden), "W_down": (hidden, d)}``, plus ``b_gate``, ``b_up``,
    ``b_down`` when ``use_bias``; ``W_gate`` is ``gate_proj.weight.T`` of a Hugging Face LLaMA MLP.

    Arguments:
        hidden: width of the gated hidden layer.
        activation: ``"silu"`` (default) or ``"gelu"``.
        use_bias: biases in the three projections (default False, as LLaMA).
    """

    hidden: int
    activation: str = "silu"
    use_bias: bool = False

    def __post_init__(self):
        positive_int(self.hidden, "hidden", "GatedMLP")
        _activation(self.activation, "GatedMLP")

    def __repr__(self) -> str:
        options = "" if self.activation == "silu" else f", activation={self.activation!r}"
        options += ", use_bias=True" if self.use_bias else ""
        return f"GatedMLP({self.hidden}{options})"

    @property
    def _keys(self) -> set[str]:
        names = {"W_gate", "W_up", "W_down"}
        return names | {"b_gate", "b_up", "b_down"} if self.use_bias else names

    def _parts(self, model_dim: int) -> Serial:
        projections = Parallel((Dense(self.hidden, use_bias=self.use_bias), Dense(self.hidden, use_bias=self.use_bias)))
        return Serial((projections, GatedProduct(self.activation), Dense(model_dim, use_bias=self.use_bias)))

    def network(self, cache: Cache) -> Serial:
        return self._parts(cache[0][0][0].shape[-1])  # the projections' caches are x itself

    def _dense(self, params: Params, name: str) -> Params:
        entry = {"W": params[f"W_{name}"]}
        return entry | {"b": params[f"b_{name}"]} if self.use_bias else entry

    def to_network(self, params: Params) -> Params:
        return ((self._dense(params, "gate"), self._dense(params, "up")), (), self._dense(params, "down"))

    def from_network(self, tree):
        """A projection's entry ``{"W", "b"}`` (gradients, diagonals) becomes ``W_<name>``, ``b_<name>``; an entry
        of another kind (a per-example norm, a Kronecker pair ``{"A", "G"}``) goes under ``W_<name>``. A pair with a
        bias acts on ``[W; b]`` jointly, which the flat layout cannot hold: it is None there (K-FAC then keeps that
        projection's plain gradient, as for any layer without Kronecker structure)."""
        (gate, up), _, down = tree
        renamed = {}
        for name, entry in (("gate", gate), ("up", up), ("down", down)):
            if isinstance(entry, dict) and "W" in entry:
                renamed[f"W_{name}"] = entry["W"]
                if "b" in entry:
                    renamed[f"b_{name}"] = entry["b"]
            elif isinstance(entry, dict) and set(entry) == {"A", "G"} and self.use_bias:
                renamed[f"W_{name}"] = renamed[f"b_{name}"] = None
            else:
                renamed[f"W_{name}"] = entry
        return renamed

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        shape = self._check_input_shape(input_shape)
        try:
            out_shape, params = self._parts(shape[-1]).init(key, shape, dtype)
        except LayerError as error:
            raise LayerError(self, error.detail) from None
        return out_shape, self.from_network(params)

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        self._check_input(x)
        check_param_keys(self, params, self._keys)
        if params["W_gate"].shape[0] != x.shape[-1]:
            raise self._fail(f"expects input width {params['W_gate'].shape[0]}, got input of shape {tuple(x.shape)}")
        try:
            return call_forward(self._parts(x.shape[-1]), self.to_network(params), x)
        except LayerError as error:
            raise LayerError(self, error.detail) from None
