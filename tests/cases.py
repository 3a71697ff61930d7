"""The shared catalogue of the tests' networks and layers (as curvlinops' ``test/cases.py``): a test draws its
problem from here, so that it is the comparison and little else.

- ``LAYERS``: every built-in layer kind (and a user's plain dataclass layer) with an example shape, for
  ``check_layer``;
- ``USER_NETWORKS``: a user's layer inside each combinator;
- ``BLOCK_NETWORKS``: networks of the combinators' blocks, for ``check_network``;
- :func:`random_network`: a random chain of dense layers, smooth activations, residual and parallel blocks.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import mnet


@dataclass(frozen=True)
class GatedLinearUnit:
    """A user's layer as a plain dataclass: ``y = (x Wa + ba) * sigmoid(x Wg + bg)``, backward by hand."""

    width: int

    def init(self, key, input_shape):
        k1, k2 = jax.random.split(key)
        n_in = input_shape[-1]
        draw = lambda k: jax.random.normal(k, (n_in, self.width)) / np.sqrt(n_in)  # noqa: E731
        zeros = jnp.zeros(self.width)
        return (*input_shape[:-1], self.width), {"Wa": draw(k1), "ba": zeros, "Wg": draw(k2), "bg": zeros}

    def forward(self, params, x):
        a = x @ params["Wa"] + params["ba"]
        s = jax.nn.sigmoid(x @ params["Wg"] + params["bg"])
        return a * s, (x, a, s)

    def backward(self, params, cache, dy):
        x, a, s = cache
        da, dg = dy * s, dy * a * s * (1 - s)
        grads = {"Wa": x.T @ da, "ba": da.sum(0), "Wg": x.T @ dg, "bg": dg.sum(0)}
        return grads, da @ params["Wa"].T + dg @ params["Wg"].T


GLU = GatedLinearUnit(6)

USER_NETWORKS = {
    "serial": mnet.serial(mnet.Dense(6), mnet.Tanh(), GLU, mnet.Dense(3)),
    "residual": mnet.serial(mnet.Dense(6), mnet.residual(GLU), mnet.Dense(3)),
    "parallel": mnet.serial(mnet.parallel(GLU, mnet.Dense(4)), mnet.Gelu(), mnet.Dense(3)),
}


#: The modern decoder's layers: each must have a second-order rule that check_layer compares (not skips).
DECODER_LAYERS = [
    (
        mnet.serial(
            mnet.Dense(4), mnet.Silu(), mnet.RMSNorm(), mnet.Softmax(), mnet.RMSNorm(1e-5, use_bias=True), mnet.Dense(3)
        ),
        (2, 5),
    ),
    (mnet.GatedMLP(5, activation="gelu", use_bias=True), (2, 4)),
    (mnet.MultiHeadSelfAttention(2, num_kv_heads=1, rope_base=100.0, causal=True), (3, 4)),
    (mnet.Unembed(5), (3, 4)),
]

LAYERS = [
    (mnet.Dense(3), (4,)),
    (mnet.Dense(3, use_bias=False), (2, 4)),
    # The activations in two chains (one compilation each instead of one per activation): check_layer checks a
    # network's rules as it checks a layer's, so a wrong activation rule would still be caught.
    (mnet.serial(mnet.Relu(), mnet.Sigmoid(), mnet.Tanh(), mnet.LeakyRelu(0.2), mnet.Elu()), (5,)),
    (mnet.serial(mnet.Gelu(), mnet.Gelu(approximate=True), mnet.Softplus(), mnet.Identity(), mnet.Softmax()), (5,)),
    (mnet.Flatten(), (2, 3)),
    (mnet.Reshape((3, 2)), (6,)),
    (mnet.Transpose((2, 0, 1)), (2, 3, 4)),
    (mnet.LayerNorm(), (3, 4)),
    (mnet.Dropout(0.3), (5,)),
    (mnet.Conv2D(2, 3, stride=2, padding="SAME"), (5, 5, 2)),
    (mnet.MaxPool2D(2), (4, 4, 2)),
    (mnet.AvgPool2D(3, stride=2, padding=1, count_include_pad=False), (5, 5, 1)),
    (mnet.Embedding(7, 3), (4,)),
    (mnet.MultiHeadSelfAttention(2, causal=True), (3, 4)),
    (mnet.residual(mnet.serial(mnet.Dense(4), mnet.Tanh())), (4,)),
    (mnet.parallel(mnet.Dense(2), mnet.Elu(), combine="concat"), (3,)),
    (mnet.serial(mnet.Embedding(5, 4), mnet.LayerNorm(), mnet.Flatten(), mnet.Dense(2)), (3,)),
    # RNN's cell rules are checked against autodiff in test_recurrent; its other rules are the shared recurrence's.
    (mnet.serial(mnet.LSTM(3), mnet.GRU(2), mnet.LastStep()), (4, 2)),
    (GLU, (4,)),
    *[(layer, shape) for layer, shape in DECODER_LAYERS],
]


BLOCK_NETWORKS = {
    "residual": (
        mnet.serial(
            mnet.Dense(5), mnet.Tanh(), mnet.residual(mnet.serial(mnet.Dense(5), mnet.Sigmoid())), mnet.Dense(3)
        ),
        mnet.losses.softmax_cross_entropy,
        (4,),
    ),
    "layernorm": (
        mnet.serial(mnet.Dense(4), mnet.LayerNorm(), mnet.Dense(2)),
        mnet.losses.sigmoid_binary_cross_entropy,
        (3,),
    ),
}


SMOOTH = [mnet.Tanh, mnet.Sigmoid, mnet.Softplus, mnet.Gelu, mnet.Elu, mnet.Relu]


def random_network(rng):
    """A random chain of dense layers, smooth activations, residual and parallel blocks."""
    width, layers = int(rng.integers(2, 5)), []
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.integers(0, 3)
        activation = SMOOTH[rng.integers(len(SMOOTH))]()
        if kind == 0:
            layers += [mnet.Dense(width), activation]
        elif kind == 1:
            layers += [
                mnet.Dense(width),
                mnet.residual(mnet.serial(activation, mnet.Dense(width))),
                SMOOTH[rng.integers(len(SMOOTH))](),
            ]
        else:
            layers += [
                mnet.parallel(mnet.Dense(width), mnet.serial(mnet.Dense(1), activation)),
                SMOOTH[rng.integers(len(SMOOTH))](),
            ]
    return mnet.serial(*layers, mnet.Dense(3))
