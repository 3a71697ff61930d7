"""Losses: values against independent references, hand gradients against jax.grad, stability at huge logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mnet
from mnet.errors import LossError
from tests.helpers import assert_trees_close

CE, BCE, MSE = mnet.losses.softmax_cross_entropy, mnet.losses.sigmoid_binary_cross_entropy, mnet.losses.mse


def reference_per_example(loss, outputs, targets):
    """Independent stable formulas: optax's implementations and the plain definition of MSE."""
    if loss is CE:
        return optax.softmax_cross_entropy_with_integer_labels(outputs, targets)
    if loss is BCE:
        return optax.sigmoid_binary_cross_entropy(outputs, targets).reshape(outputs.shape[0], -1).mean(1)
    return ((outputs - targets) ** 2).reshape(outputs.shape[0], -1).mean(1)


def cases(scale, dtype=jnp.float64):
    rng = np.random.default_rng(int(scale) % 1000)
    z = jnp.asarray(scale * rng.normal(size=(6, 5)), dtype)
    return [
        (CE, z, jnp.asarray(rng.integers(0, 5, 6))),
        (BCE, z, jnp.asarray(rng.uniform(size=(6, 5)), dtype)),
        (BCE, z, jnp.asarray(rng.integers(0, 2, (6, 5)), dtype)),
        (MSE, z, jnp.asarray(rng.normal(size=(6, 5)), dtype)),
    ]


@pytest.mark.parametrize("scale", [0.1, 3.0, 1e4])
def test_values_and_grads_against_references(scale):
    for loss, outputs, targets in cases(scale):
        per_example = loss.per_example(outputs, targets)
        assert per_example.shape == (6,) and bool(jnp.all(jnp.isfinite(per_example)))
        assert_trees_close(per_example, reference_per_example(loss, outputs, targets), 1e-12)
        assert_trees_close(loss.value(outputs, targets), jnp.mean(per_example), 1e-15)
        hand = loss.grad(outputs, targets)
        reference = jax.grad(lambda o: jnp.mean(reference_per_example(loss, o, targets)))(outputs)  # noqa: B023 (called at once, in this iteration)
        assert bool(jnp.all(jnp.isfinite(hand)))
        assert_trees_close(hand, reference, 1e-12)
        assert_trees_close(hand, jax.grad(loss.value)(outputs, targets), 1e-12)


def test_huge_logits_in_float32_stay_finite_and_exact():
    """At |z| ~ 1e4 a naive exp overflows float32 (and float64 beyond ~710); the stable forms must not."""
    for loss, outputs, targets in cases(1e4, jnp.float32):
        value, grad = loss.value(outputs, targets), loss.grad(outputs, targets)
        assert bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad)))
        reference = jnp.mean(reference_per_example(loss, outputs.astype(jnp.float64), targets.astype(targets.dtype)))
        np.testing.assert_allclose(float(value), float(reference), rtol=1e-6)


def test_cross_entropy_gradient_is_softmax_minus_onehot_over_batch():
    z = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    labels = jnp.array([2, 0])
    p = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    expected = np.array([p - [0, 0, 1], [1 / 3 - 1, 1 / 3, 1 / 3]]) / 2
    np.testing.assert_allclose(CE.grad(z, labels), expected, rtol=1e-15, atol=1e-16)
    np.testing.assert_allclose(CE.per_example(z, labels), [-np.log(p[2]), np.log(3)], rtol=1e-15)


@pytest.mark.parametrize("label_dtype", [jnp.int8, jnp.uint8, jnp.int32, jnp.int64])
def test_cross_entropy_gradient_for_any_integer_labels_under_jit(label_dtype):
    """The label is subtracted by indexing (not a dense one-hot): every integer dtype, repeated and unused
    classes, jitted, against jax.grad of optax's loss and against the plain softmax - onehot."""
    rng = np.random.default_rng(7)
    z = jnp.asarray(rng.normal(size=(9, 4)) * 2)
    labels = jnp.asarray([3, 3, 0, 3, 1, 0, 3, 1, 1], label_dtype)  # class 2 unused, class 3 four times
    hand = jax.jit(CE.grad)(z, labels)
    reference = jax.grad(lambda o: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(o, labels)))(z)
    assert_trees_close(hand, reference, 1e-12)
    dense = (jax.nn.softmax(z) - jax.nn.one_hot(labels, 4, dtype=z.dtype)) / 9
    assert_trees_close(jax.jit(CE.per_example_grad)(z, labels) / 9, dense, 1e-13)


def test_bad_targets_are_refused():
    z = jnp.zeros((4, 3))
    with pytest.raises(LossError, match=r"integer class ids"):
        CE.value(z, jnp.zeros(4))
    with pytest.raises(LossError, match=r"labels of shape \(4,\), got \(4, 3\)"):
        CE.value(z, jnp.zeros((4, 3), int))
    with pytest.raises(LossError, match=r"outputs \(4, 3\) and targets \(4, 2\)"):
        MSE.grad(z, jnp.zeros((4, 2)))
    assert mnet.losses.get("cross_entropy") is CE
    with pytest.raises(ValueError, match="unknown loss"):
        mnet.losses.get("hinge")


def test_out_of_range_labels_are_refused_or_nan():
    """The example of the issue: label -1 must not wrap to the last class, label 3 of 3 classes must not give a
    half-dropped gradient. Concrete labels raise; under jit the example's loss and gradient row are NaN."""
    ce = mnet.losses.softmax_cross_entropy
    logits = jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    for bad in (-1, 3):
        labels = jnp.array([0, bad])
        with pytest.raises(LossError, match=rf"label {bad} \(at index 1\) is outside \[0, 3\) for 3 classes"):
            ce.value(logits, labels)
        with pytest.raises(LossError, match=f"label {bad}"):
            ce.grad(logits, labels)
        value, per_example, grad = jax.jit(lambda z, y: (ce.value(z, y), ce.per_example(z, y), ce.grad(z, y)))(
            logits, labels
        )
        assert bool(jnp.isnan(value)) and bool(jnp.isfinite(per_example[0])) and bool(jnp.isnan(per_example[1]))
        assert bool(jnp.all(jnp.isfinite(grad[0]))) and bool(jnp.all(jnp.isnan(grad[1])))
    np.testing.assert_allclose(
        ce.value(logits, jnp.array([2, 2])), jnp.mean(jax.nn.logsumexp(logits, 1) - logits[:, 2]), rtol=1e-12
    )


def test_fit_refuses_labels_the_network_cannot_output():
    net = mnet.mlp([3])
    _, params = net.init(jax.random.key(0), (2,))
    x = np.ones((4, 2), np.float32)
    dataset = mnet.data.Dataset(x, np.array([0, 1, 2, 3]), x, np.array([0, 1, 2, 0]), 4, "toy")
    with pytest.raises(LossError, match=r"fit: the training labels: label 3 \(at index 3\) is outside \[0, 3\)"):
        mnet.fit(net, mnet.losses.softmax_cross_entropy, params, dataset, epochs=1, batch_size=2)


def test_cross_entropy_over_sequences_of_labels():
    """Logits (batch, T, classes) and labels (batch, T): each example's loss is the mean over its positions; the
    gradient, the Hessian square root, the Hessian-vector product and the sampled square root against jax."""
    rng = np.random.default_rng(11)
    z = jnp.asarray(rng.normal(size=(3, 4, 5)) * 2)
    labels = jnp.asarray(rng.integers(0, 5, (3, 4)))
    reference = lambda o: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(o, labels), axis=1)  # noqa: E731
    assert_trees_close(CE.per_example(z, labels), reference(z), 1e-13)
    assert_trees_close(jax.jit(CE.grad)(z, labels), jax.grad(lambda o: jnp.mean(reference(o)))(z), 1e-13)
    hessians = jax.vmap(jax.hessian(lambda o, t: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(o, t))))(
        z, labels
    )  # (batch, T, C, T, C): each example's own loss
    S = CE.hessian_sqrt(z, labels)
    assert S.shape == (20, 3, 4, 5)
    assert_trees_close(jnp.einsum("kbqc,kbrd->bqcrd", S, S), hessians, 1e-12)
    v = jnp.asarray(rng.normal(size=z.shape))
    assert_trees_close(CE.hessian_vector(z, labels, v), jnp.einsum("bqcrd,brd->bqc", hessians, v) / 3, 1e-12)
    drawn = CE.sampled_hessian_sqrt(z, labels, jax.random.key(0), 20000)
    assert_trees_close(jnp.einsum("kbqc,kbrd->bqcrd", drawn, drawn), hessians, 0.05, tree_scale=True)
    with pytest.raises(LossError, match=r"expects integer labels of shape \(3, 4\), got \(3,\)"):
        CE.value(z, labels[:, 0])
    with pytest.raises(LossError, match=r"expects integer labels of shape \(3,\), got \(3, 4\)"):
        CE.value(z[:, 0], labels)
