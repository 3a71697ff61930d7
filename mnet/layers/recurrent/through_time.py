"""Recurrent layers (RNN, LSTM, GRU) with backpropagation through time written out, and ``LastStep``.

Every recurrence here is one product for the inputs of all steps, then a scan of one product per step::

    A = x W_ih + b_ih                          (batch, T, G*hidden): every step's input projection at once
    B_t = h_{t-1} W_hh + b_hh                  (batch, G*hidden): the hidden projection, one step at a time
    (h_t, c_t) = cell(A_t, B_t, h_{t-1}, c_{t-1})

with ``G`` gate blocks (RNN 1, LSTM 4, GRU 3) laid out as in ``torch.nn.RNN/LSTM/GRU``, so ``W_ih`` is
``weight_ih_l0.T`` and the other three parameters follow.

Backpropagation through time. The parameters enter through two dense products, so their gradients are those of
two dense layers whose output cotangents are ``dA_t`` and ``dB_t``, the gradients of the step's two projections::

    dW_ih = sum_t x_t^T dA_t      db_ih = sum_t dA_t      dx_t = dA_t W_ih^T
    dW_hh = sum_t h_{t-1}^T dB_t  db_hh = sum_t dB_t

``dA_t`` and ``dB_t`` come from a reverse scan that carries the state's gradient back one step at a time::

    (dh_t, dc_t) = (dy_t + carried dh_t, carried dc_t)
    (dA_t, direct) = cell_backward(p_t, h_{t-1}, c_{t-1}; dh_t, dc_t)       p_t = pre(A_t, B_t)
    carried dh_{t-1} = dB_t W_hh^T + direct dh,   carried dc_{t-1} = direct dc

For RNN and LSTM ``dA_t = dB_t`` (the gate pre-activation is ``A_t + B_t``); GRU's candidate gate multiplies its
hidden part by the reset gate, so there ``dB_t`` is ``dA_t`` with that block scaled by ``r_t``.

What is kept: the forward pass caches the input, the states before every step (``h``, and ``c`` for an LSTM) and
every step's gate pre-activations ``p_t``, time-major. The reverse loop reads step ``t``'s ``p_t`` once and writes
that step's gradients into the same place (:meth:`Recurrent.store`), so the backward needs no second
``(T, batch, G*hidden)`` array, and the four weight sums are then single products over all steps. Recomputing
``B_t`` instead of caching ``p_t`` keeps less but costs one more product per step, which made the step slower than
``jax.grad``'s (see ``BENCHMARKS.md``, rows R1 and R2).

Since the parameter gradients are two dense layers', every rule that a dense layer has with positions (per-example
gradients, squared norms by the Gram form over time steps, NTK, GGN diagonal) is that rule applied to the two
products with the time steps as positions: only the reverse scan is the recurrence's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from mnet.core.layer import Layer, check_param_keys, positive_int
from mnet.core.protocol import Array, Cache, Params, Shape, default_float_dtype
from mnet.layers.dense import Dense

_KEYS = {"W_ih", "W_hh", "b_ih", "b_hh"}


def sigmoid_slope(s: Array) -> Array:
    """``sigma'(z)`` from ``s = sigma(z)``."""
    return s * (1 - s)


def tanh_slope(t: Array) -> Array:
    """``tanh'(z)`` from ``t = tanh(z)``."""
    return 1 - t * t


def take_columns(a: Array, columns: tuple[slice, ...]) -> Array:
    """The last axis' ``columns`` (slices), side by side."""
    if columns == (slice(None),):
        return a
    return jnp.concatenate([a[..., column] for column in columns], axis=-1)


def _summed_over_steps(a: Array, b: Array) -> Array:
    """``sum_t a_t^T b_t`` for time-major ``(T, batch, m)`` and ``(T, batch, n)``: one product contracting the
    ``T batch`` rows as a single axis. Contracting the two axes as two (an einsum ``"tbf,tbg->fg"``) ran at 106
    GFLOP/s where the one axis runs at 150 for the input weights' 64-wide ``x`` (LSTM(256), T = 100, batch 64)."""
    rows_a, rows_b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return jax.lax.dot_general(rows_a, rows_b, (((0,), (0,)), ((), ())))


def _time_major(a: Array) -> Array:
    return jnp.swapaxes(a, 0, 1)


State = tuple[Array, ...]


@dataclass(frozen=True, repr=False)
class Recurrent(Layer):
    """What RNN, LSTM and GRU share: parameters, the two products, the scans and every rule through time.

    A cell reads each step through ``p_t = pre(A_t, B_t)``, what its gates need of the two projections (their sum
    for RNN and LSTM; GRU keeps the candidate's hidden part apart). It says how one step maps ``p_t`` and the
    previous state to the next state (``cell``), that step's backward (``cell_backward``: the gradient of ``A_t``,
    and the part of the previous state's gradient that does not pass through ``B_t``), ``hidden_gradient`` (``dB_t``
    from ``dA_t``) and forward mode (``cell_tangent``; ``pre`` is linear, so ``p_t' = pre(A_t', B_t')``)."""

    hidden: int
    gates: ClassVar[int] = 1
    state_count: ClassVar[int] = 1  # h only; an LSTM also carries c

    def __post_init__(self):
        positive_int(self.hidden, "hidden", type(self).__name__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hidden})"

    def pre(self, a: Array, b: Array) -> Array:
        return a + b

    def cell(self, p: Array, previous: State) -> State:
        raise NotImplementedError

    def cell_backward(self, p: Array, previous: State, d_state: State) -> tuple[Array, State]:
        raise NotImplementedError

    def hidden_gradient(self, p: Array, d_a: Array) -> Array:
        return d_a

    def store(self, d_a: Array, d_b: Array) -> Array:
        """What the backward pass keeps of a step, in the width of ``p_t`` (it overwrites ``p_t``)."""
        return d_a

    def columns(self) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """Which columns of the store are ``dA`` and which ``dB``."""
        everything = (slice(None),)
        return everything, everything

    def stored(self, buffer: Array) -> tuple[Array, Array]:
        """``(dA, dB)`` from the stored steps."""
        ih, hh = self.columns()
        return take_columns(buffer, ih), take_columns(buffer, hh)

    def cell_tangent(self, p: Array, previous: State, p_t: Array, previous_t: State) -> State:
        raise NotImplementedError

    def cell_backward_tangent(
        self, p: Array, previous: State, d_state: State, p_t: Array, previous_t: State, d_state_t: State
    ) -> tuple[Array, State, Array, State]:
        """:meth:`cell_backward` and its derivative along the tangents of ``p``, the previous state and the state's
        gradient: ``(dA, direct, R{dA}, R{direct})``."""
        raise NotImplementedError

    def hidden_gradient_tangent(self, p: Array, d_a: Array, p_t: Array, d_a_t: Array) -> Array:
        """``R{dB_t}``, the derivative of :meth:`hidden_gradient` along the tangents."""
        return d_a_t

    def init(self, key: Array, input_shape: Shape, dtype=None) -> tuple[Shape, Params]:
        """PyTorch's initialisation: every parameter uniform in ``[-1/sqrt(hidden), 1/sqrt(hidden)]``."""
        shape = self._check_input_shape(input_shape, min_rank=2)
        if len(shape) != 2:
            raise self._fail(f"expects an example shape (T, features), got {shape}")
        dtype = default_float_dtype() if dtype is None else dtype
        width, bound = self.gates * self.hidden, 1 / math.sqrt(self.hidden)
        shapes = {"W_ih": (shape[1], width), "W_hh": (self.hidden, width), "b_ih": (width,), "b_hh": (width,)}
        keys = dict(zip(sorted(shapes), jax.random.split(key, 4)))
        params = {name: jax.random.uniform(keys[name], size, dtype, -bound, bound) for name, size in shapes.items()}
        return (shape[0], self.hidden), params

    def _check(self, params: Params, x: Array) -> None:
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.integer):
            raise self._fail(
                f"expects float features (batch, T, features), got integer input of shape {tuple(x.shape)}; "
                "for token ids put an mnet.Embedding before it"
            )
        self._check_input(x, min_rank=3)
        if x.ndim != 3:
            raise self._fail(f"expects input (batch, T, features), got shape {tuple(x.shape)}")
        check_param_keys(self, params, _KEYS)
        width = self.gates * self.hidden
        expected = {
            "W_ih": (x.shape[-1], width),
            "W_hh": (self.hidden, width),
            "b_ih": (width,),
            "b_hh": (width,),
        }
        for name, shape in expected.items():
            if tuple(params[name].shape) != shape:
                raise self._fail(
                    f"expects {name} of shape {shape} for input {tuple(x.shape)}, got {tuple(params[name].shape)}"
                )

    def _input_projection(self, params: Params, x: Array) -> Array:
        """``x W_ih`` for every step in one product, time-major ``(T, batch, G*hidden)``; ``b_ih`` is added inside
        each step, where it fuses with the step's other additions instead of costing a pass over the whole array.
        The input is made time-major first (it is the narrow side): a product that emits the time-major result from
        batch-major rows makes XLA write it transposed and copy it twice more, a tenth of the LSTM row's step."""
        return jnp.einsum("tbf,fg->tbg", _time_major(x), params["W_ih"])

    def forward(self, params: Params, x: Array) -> tuple[Array, Cache]:
        self._check(params, x)
        W_hh, b_ih, b_hh = params["W_hh"], params["b_ih"], params["b_hh"]
        zero = jnp.zeros((x.shape[0], self.hidden), jnp.result_type(x.dtype, W_hh.dtype))

        def step(state: State, a: Array) -> tuple[State, tuple[State, Array]]:
            p = self.pre(a + b_ih, state[0] @ W_hh + b_hh)
            return self.cell(p, state), (state, p)

        last, (previous, pre) = jax.lax.scan(step, (zero,) * self.state_count, self._input_projection(params, x))
        outputs = jnp.concatenate([previous[0][1:], last[0][None]])
        return _time_major(outputs), (x, previous, pre)

    def _through_time(self, params: Params, cache: Cache, dy: Array) -> Array:
        """The reverse loop over the steps: every step's stored gradients (:meth:`store`), time-major."""
        return self._reverse(params, cache, dy)[0]

    def _reverse(self, params: Params, cache: Cache, dy: Array, tangents: tuple | None = None) -> tuple:
        """The reverse loop, and with ``tangents = (dW_hh, p_t, previous_t, dy_t)`` (every step's ``R{p_t}`` and
        ``R{state_{t-1}}`` time-major, from :meth:`_tangent_scan`) its derivative along them in the same pass::

            R{dh_t} = R{dy_t} + R{carried dh_t}
            (R{dA_t}, R{direct}) = R{cell_backward}          R{dB_t} = R{hidden_gradient}
            R{carried dh_{t-1}} = R{dB_t} W_hh^T + dB_t dW_hh^T + R{direct dh}

        Returns the stored gradients and, with tangents, their tangents (stored alike), both time-major."""
        x, previous, pre = cache
        W_hh = params["W_hh"]
        dy = _time_major(dy)
        length = pre.shape[0]

        def combine(back: Array, direct: State) -> State:
            return (back if direct[0] is None else back + direct[0],) + direct[1:]

        def step(k: Array, carried: tuple) -> tuple:
            d_state, buffer, rest = carried
            t = length - 1 - k
            p, before = (buffer if rest is None else pre)[t], tuple(s[t] for s in previous)
            d_state = (d_state[0] + dy[t],) + d_state[1:]
            if rest is None:
                d_a, direct = self.cell_backward(p, before, d_state)
                d_b = self.hidden_gradient(p, d_a)
            else:
                assert tangents is not None
                (d_state_t, buffer_t), (dW_hh, p_tangents, previous_t, dy_t) = rest, tangents
                p_t, d_state_t = p_tangents[t], (d_state_t[0] + dy_t[t],) + d_state_t[1:]
                d_a, direct, d_a_t, direct_t = self.cell_backward_tangent(
                    p, before, d_state, p_t, tuple(s[t] for s in previous_t), d_state_t
                )
                d_b, d_b_t = self.hidden_gradient(p, d_a), self.hidden_gradient_tangent(p, d_a, p_t, d_a_t)
                rest = (
                    combine(d_b_t @ W_hh.T + d_b @ dW_hh.T, direct_t),
                    jax.lax.dynamic_update_index_in_dim(buffer_t, self.store(d_a_t, d_b_t), t, 0),
                )
            # Each step's pre-activations are read once, then overwritten by their gradients: one buffer for both.
            buffer = jax.lax.dynamic_update_index_in_dim(buffer, self.store(d_a, d_b), t, 0)
            return combine(d_b @ W_hh.T, direct), buffer, rest

        zeros = tuple(jnp.zeros_like(s[0]) for s in previous)
        if tangents is None:
            _, stored, _ = jax.lax.fori_loop(0, length, step, (zeros, pre, None))
            return stored, None
        # With tangents, the stores are buffers of their own and p_t, R{p_t} are only read: written in place over
        # what they store, XLA copied a whole store every step (a step's p_t also feeds fusions that it schedules
        # after the write), which made the R-operator 2 to 3 times slower.
        _, stored, rest = jax.lax.fori_loop(0, length, step, (zeros, jnp.zeros_like(pre), (zeros, jnp.zeros_like(pre))))
        return stored, rest[1]

    def _weight_sums(self, x: Array | None, h_prev: Array, stored: Array, biases: bool = True) -> Params:
        """``sum_t x_t^T dA_t`` and ``sum_t h_{t-1}^T dB_t`` (and the bias sums) from the stored steps whole (for
        GRU, whose store holds ``dA`` and ``dB``'s candidate block side by side, the products run over all of it and
        the small results keep the columns that belong to each parameter: no copy of a ``(T, batch, G*hidden)``
        array). ``x`` is batch-major, ``h_prev`` and ``stored`` time-major; ``x=None`` is a zero input."""
        ih, hh = self.columns()
        grads = {"W_hh": take_columns(_summed_over_steps(h_prev, stored), hh)}
        if x is not None:
            grads["W_ih"] = take_columns(_summed_over_steps(_time_major(x), stored), ih)
        if biases:
            sums = jnp.sum(stored, axis=(0, 1))
            grads["b_ih"], grads["b_hh"] = take_columns(sums, ih), take_columns(sums, hh)
        return grads

    def _input_gradient(self, W_ih: Array, stored: Array) -> Array:
        """``dx_t = dA_t W_ih^T``, batch-major, reading ``dA``'s columns of the store alone."""
        if stored.shape[-1] != W_ih.shape[-1]:
            W_ih = jnp.concatenate(
                [W_ih, jnp.zeros(W_ih.shape[:1] + (stored.shape[-1] - W_ih.shape[-1],), W_ih.dtype)], -1
            )
        return jnp.einsum("tbg,fg->btf", stored, W_ih)

    def backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        """The four sums over time as products with the stored gradients whole (:meth:`_weight_sums`)."""
        stored = self._through_time(params, cache, dy)
        return self._weight_sums(cache[0], cache[1][0], stored), self._input_gradient(params["W_ih"], stored)

    def backward_tangent(
        self, params: Params, cache: Cache, tangents: tuple, dy: Array, dy_tangent: Array
    ) -> tuple[Params, Array, Array]:
        """The R-operator of backpropagation through time: the tangent scan again (for every step's ``R{p_t}`` and
        ``R{state_{t-1}}``), then one reverse loop carrying the state's gradient and its tangent
        (:meth:`_reverse`), then the sums, each with the cross term of its dense product::

            R{dW_ih} = sum_t x_t'^T dA_t + x_t^T R{dA_t}         R{db_ih} = sum_t R{dA_t}
            R{dW_hh} = sum_t h_{t-1}'^T dB_t + h_{t-1}^T R{dB_t}  R{db_hh} = sum_t R{dB_t}
            R{dx_t} = R{dA_t} W_ih^T + dA_t W_ih'^T

        Returns ``(R{dparams}, dx, R{dx})``."""
        dparams, dx_tangent = tangents
        x, previous = cache[0], cache[1]
        p_t, previous_t, _ = self._tangent_scan(params, cache, dparams, dx_tangent)
        stored, stored_t = self._reverse(params, cache, dy, (dparams["W_hh"], p_t, previous_t, _time_major(dy_tangent)))
        hv = self._weight_sums(x, previous[0], stored_t)
        cross = self._weight_sums(dx_tangent, previous_t[0], stored, biases=False)
        hv = {name: value + cross.get(name, 0) for name, value in hv.items()}
        down = self._input_gradient(params["W_ih"], stored)
        down_t = self._input_gradient(params["W_ih"], stored_t) + self._input_gradient(dparams["W_ih"], stored)
        return hv, down, down_t

    # Every other rule: the two dense products' rule, the time steps as positions.
    def _products(self, params: Params) -> tuple[Dense, dict, dict]:
        return (
            Dense(self.gates * self.hidden),
            {"W": params["W_ih"], "b": params["b_ih"]},
            {"W": params["W_hh"], "b": params["b_hh"]},
        )

    @staticmethod
    def _layout(ih: Params, hh: Params) -> Params:
        return {"W_ih": ih["W"], "b_ih": ih["b"], "W_hh": hh["W"], "b_hh": hh["b"]}

    def _batch_major(self, params: Params, cache: Cache, dy: Array) -> tuple[Array, Array, Array]:
        d_a, d_b = self.stored(self._through_time(params, cache, dy))
        return _time_major(d_a), _time_major(d_b), _time_major(cache[1][0])

    def per_example_backward(self, params: Params, cache: Cache, dy: Array) -> tuple[Params, Array]:
        """``dW_ih_b = X_b^T dA_b`` and ``dW_hh_b = H_b^T dB_b`` over the example's time steps."""
        dense, ih, hh = self._products(params)
        d_a, d_b, h_prev = self._batch_major(params, cache, dy)
        ih_grads, dx = dense.per_example_backward(ih, cache[0], d_a)
        hh_grads, _ = dense.per_example_backward(hh, h_prev, d_b)
        return self._layout(ih_grads, hh_grads), dx

    def per_example_sq_norms(self, params: Params, cache: Cache, dy: Array) -> tuple[Array, Array]:
        """Weight sharing across time, as in convolution: ``||X_b^T dA_b||^2 = <X_b X_b^T, dA_b dA_b^T>`` over the
        ``T x T`` Gram matrices when that is cheaper than building ``dW_b`` (Dense's rule decides)."""
        dense, ih, hh = self._products(params)
        d_a, d_b, h_prev = self._batch_major(params, cache, dy)
        ih_sq, dx = dense.per_example_sq_norms(ih, cache[0], d_a)
        hh_sq, _ = dense.per_example_sq_norms(hh, h_prev, d_b)
        return ih_sq + hh_sq, dx

    def _stacks(self, params: Params, cache: Cache, stack: Array) -> tuple[Array, Array, Array]:
        """The projection gradients of every entry of a ``(K, batch, T, hidden)`` stack, batch-major."""
        d_a, d_b = self.stored(jax.vmap(lambda dy: self._through_time(params, cache, dy))(stack))
        return jnp.swapaxes(d_a, 1, 2), jnp.swapaxes(d_b, 1, 2), _time_major(cache[1][0])

    def ntk_contribution(self, params: Params, cache1: Cache, cache2: Cache, dys1: Array, dys2: Array) -> Array:
        dense, ih, hh = self._products(params)
        a1, b1, h1 = self._stacks(params, cache1, dys1)
        a2, b2, h2 = self._stacks(params, cache2, dys2)
        return dense.ntk_contribution(ih, cache1[0], cache2[0], a1, a2) + dense.ntk_contribution(hh, h1, h2, b1, b2)

    def per_example_diag_ggn(self, params: Params, cache: Cache, S: Array) -> Params:
        dense, ih, hh = self._products(params)
        s_a, s_b, h_prev = self._stacks(params, cache, S)
        return self._layout(dense.per_example_diag_ggn(ih, cache[0], s_a), dense.per_example_diag_ggn(hh, h_prev, s_b))

    def kronecker_factors(self, params: Params, cache: Cache, S: Array, kept: Array | None = None) -> Params:
        """The two products' factors, the time steps as positions (:meth:`mnet.Dense.kronecker_factors`): ``A`` of
        the inputs ``x_t`` for ``W_ih`` and of the previous states ``h_{t-1}`` for ``W_hh``, ``G`` of the columns
        carried back through time to the gate pre-activations. The flat layout cannot hold a pair acting on
        ``[W; b]`` jointly, so the pairs are the matrices' alone (no 1 appended) and the biases have None (K-FAC
        keeps their plain gradient)."""
        s_a, s_b, h_prev = self._stacks(params, cache, S)
        dense = Dense(self.gates * self.hidden, use_bias=False)
        return {
            "W_ih": dense.kronecker_factors({"W": params["W_ih"]}, cache[0], s_a, kept),
            "b_ih": None,
            "W_hh": dense.kronecker_factors({"W": params["W_hh"]}, h_prev, s_b, kept),
            "b_hh": None,
        }

    def eigen_correction(self, params: Params, cache: Cache, S: Array, basis: Params) -> Params:
        """EK-FAC's eigenvalues of both products in their bases (:meth:`mnet.Dense.eigen_correction`), each
        example's gradient summed over its time steps; None where ``basis`` has no pair."""
        s_a, s_b, h_prev = self._stacks(params, cache, S)
        dense = Dense(self.gates * self.hidden, use_bias=False)
        corrected: dict = {"b_ih": None, "b_hh": None}
        for name, inputs, columns in (("W_ih", cache[0], s_a), ("W_hh", h_prev, s_b)):
            pair = basis.get(name) if isinstance(basis, dict) else None
            corrected[name] = (
                None if pair is None else dense.eigen_correction({"W": params[name]}, inputs, columns, pair)
            )
        return corrected

    def _tangent_scan(self, params: Params, cache: Cache, dparams: Params, dx: Array | None) -> tuple:
        """The forward scan along the tangent: every step's ``R{p_t}`` and ``R{state_{t-1}}`` (time-major, as the
        cache keeps ``p_t`` and the states) and the last state's tangent."""
        x, previous, pre = cache
        W_hh = params["W_hh"]
        a_t = jnp.einsum("btf,fg->tbg", x, dparams["W_ih"]) + dparams["b_ih"]
        if dx is not None:
            a_t = a_t + jnp.einsum("btf,fg->tbg", dx, params["W_ih"])
        b_t = jnp.einsum("tbh,hg->tbg", previous[0], dparams["W_hh"]) + dparams["b_hh"]

        def step(previous_t: State, inputs: tuple) -> tuple[State, tuple[Array, State]]:
            p, before, a_tangent, b_tangent = inputs
            p_t = self.pre(a_tangent, b_tangent + previous_t[0] @ W_hh)
            return self.cell_tangent(p, before, p_t, previous_t), (p_t, previous_t)

        zeros = tuple(jnp.zeros_like(s[0]) for s in previous)
        last_t, (p_t, previous_t) = jax.lax.scan(step, zeros, (pre, previous, a_t, b_t))
        return p_t, previous_t, last_t

    def tangent(self, params: Params, cache: Cache, dparams: Params, dx: Array | None) -> Array:
        """Forward mode, a scan forward beside the recurrence, reading the cached states::

        A_t' = x_t' W_ih + x_t W_ih' + b_ih'          (every step in one product)
        B_t' = h_{t-1}' W_hh + h_{t-1} W_hh' + b_hh'
        (h_t', c_t') = cell_tangent(A_t, B_t, state_{t-1}; A_t', B_t', state_{t-1}')
        """
        _, previous_t, last_t = self._tangent_scan(params, cache, dparams, dx)
        return _time_major(jnp.concatenate([previous_t[0][1:], last_t[0][None]]))
