"""The three cells of :class:`mnet.layers.recurrent.through_time.Recurrent`: one step of RNN, LSTM and GRU, each
with its backward, tangent and backward-tangent rules, in the gate order and bias placement of ``torch.nn``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from mnet.core.protocol import Array
from mnet.errors import SettingError
from mnet.layers.recurrent.through_time import Recurrent, sigmoid_slope, tanh_slope


@dataclass(frozen=True, repr=False)
class RNN(Recurrent):
    """The Elman recurrence ``h_t = phi(A_t + B_t)`` (``torch.nn.RNN``, ``nonlinearity`` tanh or relu).

    Step backward: ``dA_t = dB_t = dh_t * phi'(A_t + B_t)``; the previous state's gradient passes only through
    ``B_t``. Forward mode: ``h_t' = phi'(z_t) (A_t' + B_t')``.

    Arguments:
        hidden: the state width.
        activation: ``"tanh"`` (default) or ``"relu"``.
    """

    activation: str = "tanh"

    def __post_init__(self):
        super().__post_init__()
        if self.activation not in ("tanh", "relu"):
            raise SettingError(f"RNN: activation must be 'tanh' or 'relu', got {self.activation!r}")

    def __repr__(self) -> str:
        return f"RNN({self.hidden})" if self.activation == "tanh" else f"RNN({self.hidden}, activation='relu')"

    def _slope(self, z: Array) -> Array:
        return tanh_slope(jnp.tanh(z)) if self.activation == "tanh" else (z > 0).astype(z.dtype)

    def cell(self, p, previous):
        return (jnp.tanh(p) if self.activation == "tanh" else jnp.maximum(p, 0),)

    def cell_backward(self, p, previous, d_state):
        return d_state[0] * self._slope(p), (None,)

    def cell_tangent(self, p, previous, p_t, previous_t):
        return (self._slope(p) * p_t,)

    def cell_backward_tangent(self, p, previous, d_state, p_t, previous_t, d_state_t):
        """``R{dA_t} = R{dh_t} phi'(z_t) + dh_t phi''(z_t) R{z_t}``, with ``tanh'' = -2 tanh tanh'`` and
        ``relu'' = 0``."""
        slope = self._slope(p)
        d_a_t = d_state_t[0] * slope
        if self.activation == "tanh":
            d_a_t = d_a_t - 2 * d_state[0] * jnp.tanh(p) * slope * p_t
        return d_state[0] * slope, (None,), d_a_t, (None,)


@dataclass(frozen=True, repr=False)
class LSTM(Recurrent):
    """Long short-term memory (``torch.nn.LSTM``), gates ``i, f, g, o`` in that order::

        [i, f, g, o] = [sigma, sigma, tanh, sigma](A_t + B_t)
        c_t = f * c_{t-1} + i * g           h_t = o * tanh(c_t)

    Step backward, with ``dc = dc_t + dh_t * o * (1 - tanh(c_t)^2)``::

        do = dh_t * tanh(c_t)   di = dc * g   df = dc * c_{t-1}   dg = dc * i     direct dc_{t-1} = dc * f
        dA_t = dB_t = [di * i(1-i), df * f(1-f), dg * (1-g^2), do * o(1-o)]

    Forward mode: the gates' tangents ``i' = i(1-i) z_i'`` (and alike), then
    ``c_t' = f' c_{t-1} + f c_{t-1}' + i' g + i g'`` and ``h_t' = o' tanh(c_t) + o (1 - tanh(c_t)^2) c_t'``.
    """

    gates: ClassVar[int] = 4
    state_count: ClassVar[int] = 2

    def _gates(self, p: Array) -> tuple[Array, Array, Array, Array]:
        # Every gate's activation in one elementwise pass over all four (each by its own exact function): split
        # four ways, the three sigmoids and the tanh were fused into each step's cell update and ran there on one
        # thread, 113 us a step of LSTM(256) at batch 64; whole, the forward step is 9% faster.
        hidden = p.shape[-1] // 4
        is_g = (jnp.arange(4 * hidden) // hidden) == 2
        i, f, g, o = jnp.split(jnp.where(is_g, jnp.tanh(p), jax.nn.sigmoid(p)), 4, axis=-1)
        return i, f, g, o

    def cell(self, p, previous):
        i, f, g, o = self._gates(p)
        c = f * previous[1] + i * g
        return o * jnp.tanh(c), c

    def cell_backward(self, p, previous, d_state):
        i, f, g, o = self._gates(p)
        c_prev = previous[1]
        tanh_c = jnp.tanh(f * c_prev + i * g)
        dh, dc_carried = d_state
        dc = dc_carried + dh * o * tanh_slope(tanh_c)
        dz = jnp.concatenate(
            [
                dc * g * sigmoid_slope(i),
                dc * c_prev * sigmoid_slope(f),
                dc * i * tanh_slope(g),
                dh * tanh_c * sigmoid_slope(o),
            ],
            axis=-1,
        )
        return dz, (None, dc * f)

    def cell_tangent(self, p, previous, p_t, previous_t):
        i, f, g, o = self._gates(p)
        zi, zf, zg, zo = jnp.split(p_t, 4, axis=-1)
        i_t, f_t, g_t, o_t = zi * sigmoid_slope(i), zf * sigmoid_slope(f), zg * tanh_slope(g), zo * sigmoid_slope(o)
        c_prev = previous[1]
        tanh_c = jnp.tanh(f * c_prev + i * g)
        c_t = f_t * c_prev + f * previous_t[1] + i_t * g + i * g_t
        return o_t * tanh_c + o * tanh_slope(tanh_c) * c_t, c_t

    def cell_backward_tangent(self, p, previous, d_state, p_t, previous_t, d_state_t):
        """Each product of :meth:`cell_backward` by the product rule, with the gates' tangents of
        :meth:`cell_tangent` and the slopes' ``R{s(1-s)} = (1-2s) s'`` and ``R{1-t^2} = -2 t t'``."""
        i, f, g, o = self._gates(p)
        zi, zf, zg, zo = jnp.split(p_t, 4, axis=-1)
        si, sf, sg, so = sigmoid_slope(i), sigmoid_slope(f), tanh_slope(g), sigmoid_slope(o)
        i_t, f_t, g_t, o_t = zi * si, zf * sf, zg * sg, zo * so
        c_prev, c_prev_t = previous[1], previous_t[1]
        tanh_c = jnp.tanh(f * c_prev + i * g)
        sc = tanh_slope(tanh_c)
        tanh_c_t = sc * (f_t * c_prev + f * c_prev_t + i_t * g + i * g_t)
        (dh, dc_carried), (dh_t, dc_carried_t) = d_state, d_state_t
        dc = dc_carried + dh * o * sc
        dc_t = dc_carried_t + dh_t * o * sc + dh * o_t * sc - 2 * dh * o * tanh_c * tanh_c_t
        dz = jnp.concatenate([dc * g * si, dc * c_prev * sf, dc * i * sg, dh * tanh_c * so], axis=-1)
        dz_t = jnp.concatenate(
            [
                dc_t * g * si + dc * g_t * si + dc * g * (1 - 2 * i) * i_t,
                dc_t * c_prev * sf + dc * c_prev_t * sf + dc * c_prev * (1 - 2 * f) * f_t,
                dc_t * i * sg + dc * i_t * sg - 2 * dc * i * g * g_t,
                dh_t * tanh_c * so + dh * tanh_c_t * so + dh * tanh_c * (1 - 2 * o) * o_t,
            ],
            axis=-1,
        )
        return dz, (None, dc * f), dz_t, (None, dc_t * f + dc * f_t)


@dataclass(frozen=True, repr=False)
class GRU(Recurrent):
    """Gated recurrent unit (``torch.nn.GRU``), gates ``r, z, n`` in that order, the candidate's hidden part
    inside the reset gate (``B_n`` includes ``b_hn``)::

        r = sigma(A_r + B_r)    z = sigma(A_z + B_z)    n = tanh(A_n + r * B_n)
        h_t = (1 - z) * n + z * h_{t-1}

    Step backward, with ``dn = dh_t (1 - z) (1 - n^2)`` the gradient of the candidate's pre-activation::

        dr = dn * B_n * r(1-r)     dz = dh_t (h_{t-1} - n) z(1-z)     direct dh_{t-1} = dh_t * z
        dA_t = [dr, dz, dn]        dB_t = [dr, dz, dn * r]

    Forward mode: ``r' = r(1-r)(A_r' + B_r')``, ``z'`` alike, ``n' = (1-n^2)(A_n' + r' B_n + r B_n')`` and
    ``h_t' = z' (h_{t-1} - n) + (1 - z) n' + z h_{t-1}'``.
    """

    gates: ClassVar[int] = 3

    def pre(self, a: Array, b: Array) -> Array:
        """``[A_r + B_r, A_z + B_z, A_n, B_n]``: the candidate's hidden part stays apart, since ``r`` scales it."""
        hidden = self.hidden
        return jnp.concatenate(
            [a[..., : 2 * hidden] + b[..., : 2 * hidden], a[..., 2 * hidden :], b[..., 2 * hidden :]], -1
        )

    def _gates(self, p: Array) -> tuple[Array, Array, Array, Array]:
        z_r, z_z, a_n, b_n = jnp.split(p, 4, axis=-1)
        r = jax.nn.sigmoid(z_r)
        return r, jax.nn.sigmoid(z_z), jnp.tanh(a_n + r * b_n), b_n

    def cell(self, p, previous):
        r, z, n, _ = self._gates(p)
        return ((1 - z) * n + z * previous[0],)

    def cell_backward(self, p, previous, d_state):
        r, z, n, b_n = self._gates(p)
        dh = d_state[0]
        dn = dh * (1 - z) * tanh_slope(n)
        dr = dn * b_n * sigmoid_slope(r)
        dz = dh * (previous[0] - n) * sigmoid_slope(z)
        return jnp.concatenate([dr, dz, dn], axis=-1), (dh * z,)

    def hidden_gradient(self, p, d_a):
        """``dB_t = [dr, dz, dn * r]``: the candidate's hidden part enters through the reset gate."""
        hidden = self.hidden
        r = jax.nn.sigmoid(p[..., :hidden])
        return jnp.concatenate([d_a[..., : 2 * hidden], d_a[..., 2 * hidden :] * r], axis=-1)

    def store(self, d_a, d_b):
        """``[dr, dz, dn, dn * r]``: ``dA_t`` and the candidate's block of ``dB_t``, as wide as ``p_t``."""
        return jnp.concatenate([d_a, d_b[..., 2 * self.hidden :]], axis=-1)

    def columns(self):
        hidden = self.hidden
        return (slice(0, 3 * hidden),), (slice(0, 2 * hidden), slice(3 * hidden, 4 * hidden))

    def cell_tangent(self, p, previous, p_t, previous_t):
        r, z, n, b_n = self._gates(p)
        zr, zz, an, bn = jnp.split(p_t, 4, axis=-1)
        r_t, z_t = zr * sigmoid_slope(r), zz * sigmoid_slope(z)
        n_t = (an + r_t * b_n + r * bn) * tanh_slope(n)
        return (z_t * (previous[0] - n) + (1 - z) * n_t + z * previous_t[0],)

    def cell_backward_tangent(self, p, previous, d_state, p_t, previous_t, d_state_t):
        """Each product of :meth:`cell_backward` by the product rule, with the tangents of :meth:`cell_tangent`."""
        r, z, n, b_n = self._gates(p)
        zr, zz, an, bn = jnp.split(p_t, 4, axis=-1)
        sr, sz, sn = sigmoid_slope(r), sigmoid_slope(z), tanh_slope(n)
        r_t, z_t = zr * sr, zz * sz
        n_t = (an + r_t * b_n + r * bn) * sn
        (dh,), (dh_t,), (h_prev,), (h_prev_t,) = d_state, d_state_t, previous, previous_t
        dn = dh * (1 - z) * sn
        dn_t = dh_t * (1 - z) * sn - dh * z_t * sn - 2 * dh * (1 - z) * n * n_t
        dr = dn * b_n * sr
        dr_t = dn_t * b_n * sr + dn * bn * sr + dn * b_n * (1 - 2 * r) * r_t
        dz = dh * (h_prev - n) * sz
        dz_t = dh_t * (h_prev - n) * sz + dh * (h_prev_t - n_t) * sz + dh * (h_prev - n) * (1 - 2 * z) * z_t
        return (
            jnp.concatenate([dr, dz, dn], axis=-1),
            (dh * z,),
            jnp.concatenate([dr_t, dz_t, dn_t], axis=-1),
            (dh_t * z + dh * z_t,),
        )

    def hidden_gradient_tangent(self, p, d_a, p_t, d_a_t):
        """``R{dn * r} = R{dn} r + dn r'``."""
        hidden = self.hidden
        r = jax.nn.sigmoid(p[..., :hidden])
        r_t = p_t[..., :hidden] * sigmoid_slope(r)
        candidate = d_a_t[..., 2 * hidden :] * r + d_a[..., 2 * hidden :] * r_t
        return jnp.concatenate([d_a_t[..., : 2 * hidden], candidate], axis=-1)
