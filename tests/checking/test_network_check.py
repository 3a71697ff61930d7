"""``mnet.check_network``: every quantity of a whole network against autodiff, and the wrong one named."""

from dataclasses import dataclass

import jax
import jax.numpy as jnp

import mnet
from mnet.core.walk import units

QUANTITIES = [
    "value_and_grad",
    "per_example_grads",
    "per_example_grad_norms",
    "jacobian",
    "ntk",
    "jvp",
    "ggn_vector_product",
    "hessian_vector_product",
    "diag_ggn",
    "per_example_diag_ggn",
    "diag_hessian",
    "kfac_factors",
]


@dataclass(frozen=True, repr=False)
class DiagHessianOff(mnet.Dense):
    def diag_hessian(self, params, x, curvature):
        share, below = super().diag_hessian(params, x, curvature)
        return {"W": share["W"], "b": 0.99 * share["b"]}, below


def test_every_quantity_agrees_on_a_network_with_blocks():
    net = mnet.serial(
        mnet.Dense(5), mnet.Tanh(), mnet.residual(mnet.serial(mnet.Dense(5), mnet.Sigmoid())), mnet.Dense(3)
    )
    report = mnet.check_network(net, mnet.losses.softmax_cross_entropy, (4,), seed=1)
    assert report.ok, str(report)
    assert [row.rule for row in report.rows] == QUANTITIES
    assert all(row.agreement is not None and row.agreement.max_rel_error < 1e-12 for row in report.rows), str(report)
    assert str(report).startswith("check_network serial(") and "every rule agrees" in str(report)


@dataclass(frozen=True, repr=False)
class NoSecondOrder(mnet.Dense):
    """A user's dense layer without the Hessian-diagonal rule."""

    diag_hessian = None


def test_a_wrong_second_order_rule_is_named_and_the_rest_agree():
    net = mnet.serial(mnet.Dense(4), mnet.Elu(), DiagHessianOff(2))
    report = mnet.check_network(net, mnet.losses.mse, (3,))
    assert not report.ok and report.wrong == ["diag_hessian"], str(report)
    assert report.to_dict()["wrong"] == ["diag_hessian"]


def test_unsupported_quantities_are_reported_not_failed():
    net = mnet.serial(mnet.Dense(4), mnet.Tanh(), NoSecondOrder(2))
    report = mnet.check_network(net, mnet.losses.sigmoid_binary_cross_entropy, (3,))
    assert report.ok, str(report)
    assert report["diag_hessian"].source == "absent" and "Dense(2) at position [2]" in report["diag_hessian"].note
    assert report["value_and_grad"].agreement.ok


def test_units_finds_every_dense_wherever_it_sits():
    net = mnet.serial(
        mnet.Dense(4),
        mnet.residual(mnet.serial(mnet.Dense(4), mnet.Relu())),
        mnet.parallel(mnet.Dense(2), mnet.Dense(3)),
        mnet.Reshape((5, 1, 1)),
        mnet.Conv2D(2, 1),
        mnet.Flatten(),
        mnet.Reshape((5, 2)),
        mnet.MultiHeadSelfAttention(1),
    )
    _, params = net.init(jax.random.key(0), (3,))
    found = units(net, params, jax.ShapeDtypeStruct((2, 3), jnp.float32))
    dense = [path for path, layer in found if isinstance(layer, mnet.Dense)]
    assert dense == [(0,), (1, 0), (2, 0), (2, 1), (4,), (7, "k"), (7, "o"), (7, "q"), (7, "v")]
    for path in dense:  # each path leads to a dense-like entry of the params
        entry = params
        for key in path:
            entry = entry[key]
        assert set(entry) == {"W", "b"}
