"""Padding masks through networks and quantities: a padded batch gives every example exactly the quantities it has
alone, unpadded (a fully padded example included), the mask reaches attention inside every combinator, and bad
masks are named."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mnet
from mnet.checking.layer_report import perturbed
from mnet.errors import LayerError, LossError
from mnet.training.fit import epoch_key
from mnet.training.layout import epoch_order
from tests.helpers import assert_trees_close

LOSS = mnet.losses.softmax_cross_entropy
VOCAB, T = 7, 4
LENGTHS = [4, 2, 0]  # the last example is all padding


def encoder():
    """Not causal, so that a padded key would reach every valid query if the mask did not stop it."""
    attention = mnet.MultiHeadSelfAttention(2, num_kv_heads=1, rope_base=50.0, use_bias=False)
    return mnet.serial(
        mnet.Embedding(VOCAB, 4),
        mnet.residual(mnet.serial(mnet.RMSNorm(), attention)),
        mnet.Silu(),
        mnet.Dense(VOCAB),
    )


def padded_batch():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, VOCAB, (len(LENGTHS), T + 1)))
    mask = jnp.arange(T)[None, :] < jnp.array(LENGTHS)[:, None]
    return ids[:, :T], ids[:, 1:], mask


def tree_mean(trees):
    return jax.tree_util.tree_map(lambda *leaves: sum(leaves) / len(leaves), *trees)


def problem(net, seed):
    _, params = net.init(jax.random.key(seed), (T,), jnp.float64)
    return perturbed(params, np.random.default_rng(seed))


def test_a_padded_batch_gives_each_example_its_own_quantities():
    net = encoder()
    params = problem(net, 1)
    x, y, mask = padded_batch()
    v = jax.tree_util.tree_map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape), params)
    batch_fns = {
        "value_and_grad": mnet.value_and_grad(net, LOSS),
        "hvp": lambda *a, **k: mnet.hessian_vector_product(net, LOSS)(*a, v, **k),
    }
    padded = {name: jax.jit(f)(params, x, y, mask=mask) for name, f in batch_fns.items()}
    per_example = jax.jit(mnet.per_example_grads(net, LOSS))(params, x, y, mask=mask)
    norms = jax.jit(mnet.per_example_grad_norms(net, LOSS))(params, x, y, mask=mask)
    alone = []
    for b, n in enumerate(LENGTHS):
        if n == 0:  # no token: no loss, no gradient
            assert float(norms[b]) == 0.0
            assert all(float(jnp.max(jnp.abs(g[b]))) == 0 for g in jax.tree_util.tree_leaves(per_example))
            alone.append(None)
            continue
        one = {name: jax.jit(f)(params, x[b : b + 1, :n], y[b : b + 1, :n]) for name, f in batch_fns.items()}
        alone.append(one)
        assert_trees_close(jax.tree_util.tree_map(lambda g, b=b: g[b], per_example), one["value_and_grad"][1], 1e-12)
        norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(one["value_and_grad"][1])))
        assert_trees_close(norms[b], norm, 1e-12)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, alone[0])
    expected = tree_mean([zeros if one is None else one for one in alone])  # L = mean over all three examples
    for name in batch_fns:
        assert_trees_close(padded[name], expected[name], 1e-12)
    # The curvature under the mask against autodiff's dense Hessian of the masked loss.
    masked_loss, labels = LOSS.masked(y, mask)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    H = jax.jit(jax.hessian(lambda f: masked_loss.value(net.apply(unravel(f), x, mask=mask), labels)))(flat)
    diagonal = jax.jit(mnet.diag_hessian(net, LOSS))(params, x, y, mask=mask)
    assert_trees_close(jax.flatten_util.ravel_pytree(diagonal)[0], jnp.diag(H), 1e-10)


def test_the_mask_reaches_attention_inside_every_combinator():
    attention = mnet.MultiHeadSelfAttention(2)
    net = mnet.serial(
        mnet.Embedding(VOCAB, 4),
        mnet.residual(mnet.parallel(attention, mnet.serial(mnet.Dense(4), attention), combine="sum")),
        mnet.Dense(3),
    )
    assert net.takes_mask and not mnet.serial(mnet.Dense(2)).takes_mask
    params = problem(net, 2)
    x, _, mask = padded_batch()
    moved = jnp.where(mask, x, (x + 3) % VOCAB)  # other tokens at the padded positions
    y1, y2 = net.apply(params, x, mask=mask), net.apply(params, moved, mask=mask)
    assert_trees_close(jnp.where(mask[..., None], y1, 0), jnp.where(mask[..., None], y2, 0), 1e-13)
    assert float(jnp.max(jnp.abs(net.apply(params, x) - net.apply(params, moved)))) > 1e-3  # without: it leaks
    report = mnet.compare_gradients(net, LOSS, params, x, jnp.zeros_like(x) % 3, mask=mask)
    assert report.ok, str(report)
    assert sum("MultiHeadSelfAttention" in row.layer for row in report.layers) == 2


def test_ignored_labels_train_a_causal_decoder_as_the_mask_does():
    net = mnet.models.gpt(vocab=VOCAB, context=T, d_model=4, num_layers=1, num_heads=2, hidden=4)
    params = problem(net, 3)
    x, y, mask = padded_batch()
    ignoring = mnet.losses.SoftmaxCrossEntropy(ignore_index=-100)
    labels = jnp.where(mask, y, -100)
    # Causal attention with padding at the end: no valid query sees a padded key, so the labels alone suffice.
    by_labels = jax.jit(mnet.value_and_grad(net, ignoring))(params, x, labels)
    assert_trees_close(by_labels, jax.jit(mnet.value_and_grad(net, LOSS))(params, x, y, mask=mask))
    logits = jax.jit(net.apply)(params, x)
    assert float(ignoring.accuracy(logits, labels)) == pytest.approx(
        float(jnp.mean((jnp.argmax(logits, -1) == y)[mask]))
    )


def test_bad_masks_are_named():
    net = encoder()
    params = problem(net, 1)
    x, y, mask = padded_batch()
    with pytest.raises(
        LayerError, match=r"MultiHeadSelfAttention.*at position \[1\]\[0\]\[1\].*padding mask \(batch, T\)"
    ):
        net.apply(params, x, mask=mask[:, :2])
    with pytest.raises(LayerError, match="got int32"):
        net.apply(params, x, mask=mask.astype(jnp.int32))
    with pytest.raises(LossError, match="padding mask of the labels' shape"):
        mnet.value_and_grad(net, LOSS)(params, x, y[:, :2], mask=mask)
    with pytest.raises(LossError, match="no positions to leave out"):
        mnet.losses.mse.masked(jnp.zeros((3, 4)), mask)
    with pytest.raises(ValueError, match="ignore_index must be a negative int"):
        mnet.losses.SoftmaxCrossEntropy(ignore_index=3)
    with pytest.raises(LossError, match="label -1"):  # without ignore_index, -1 is no label
        LOSS.value(jnp.zeros((2, 3)), jnp.array([0, -1]))


def test_kronecker_factors_under_a_mask_count_the_kept_positions_only():
    """Every factor is a mean over positions, so the padded batch's equals the unpadded examples' factors pooled by
    their token counts (the all-padding example counts for nothing); the embedding's ``A`` is the ids' frequencies."""
    net = encoder()
    params = problem(net, 2)
    x, y, mask = padded_batch()
    padded = jax.jit(mnet.kfac_factors(net, LOSS))(params, x, y, mask=mask)
    pooled = [
        jax.tree_util.tree_map(
            lambda f, n=n: n * f, mnet.kfac_factors(net, LOSS)(params, x[b : b + 1, :n], y[b : b + 1, :n])
        )
        for b, n in enumerate(LENGTHS)
        if n
    ]
    expected = jax.tree_util.tree_map(lambda *fs: sum(fs) / sum(LENGTHS), *pooled)
    assert_trees_close(padded, expected, rtol=1e-12)
    tokens = np.concatenate([np.asarray(x[b, :n]) for b, n in enumerate(LENGTHS)])
    np.testing.assert_allclose(np.diag(padded[0]["A"]), np.bincount(tokens, minlength=VOCAB) / tokens.size, rtol=1e-15)
    assert set(padded[1][1]) == {"q", "k", "v", "o"} and padded[1][0] is None  # RMSNorm: no Kronecker structure


def padded_dataset(n=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (n, T))
    masks = np.arange(T)[None] < rng.integers(0, T + 1, n)[:, None]  # some examples all padding
    labels = np.roll(ids, -1, 1)
    return mnet.data.Dataset(
        ids[:8], labels[:8], ids[8:], labels[8:], VOCAB, "padded", mask_train=masks[:8], mask_test=masks[8:]
    )


def test_fit_trains_a_padded_non_causal_model_as_autodiff_on_the_masked_loss_does():
    """The masks of each batch reach attention and the loss: two epochs of SGD equal the same steps taken with
    ``jax.grad`` of the masked loss, batch by batch in fit's order; K-FAC gets the mask too."""
    net = encoder()
    params = problem(net, 3)
    data = padded_dataset()
    run = mnet.fit(net, LOSS, params, data, optimizer=optax.sgd(0.1), epochs=2, batch_size=4)
    expected = params
    for epoch in (1, 2):
        for rows in np.asarray(epoch_order(epoch_key(0, epoch), 8, 4)):
            mask = jnp.asarray(data.mask_train[rows])
            masked, labels = mnet.losses.with_mask(LOSS, jnp.asarray(data.y_train[rows]), mask)
            g = jax.grad(lambda p: masked.value(net.apply(p, jnp.asarray(data.x_train[rows]), mask=mask), labels))(  # noqa: B023 (called at once, in this iteration)
                expected
            )
            expected = jax.tree_util.tree_map(lambda a, d: a - 0.1 * d, expected, g)
    assert_trees_close(run.params, expected, 1e-12)
    masked, labels = LOSS.masked(jnp.asarray(data.y_test), jnp.asarray(data.mask_test))
    outputs = net.apply(run.params, jnp.asarray(data.x_test), mask=jnp.asarray(data.mask_test))
    np.testing.assert_allclose(run.history.test_loss[-1], masked.value(outputs, labels), rtol=1e-12)
    kfac = mnet.kfac(net, LOSS, (T,), learning_rate=0.05)
    assert np.isfinite(mnet.fit(net, LOSS, params, data, optimizer=kfac, epochs=1, batch_size=4).history.train_loss[0])


def test_fit_refuses_masks_it_cannot_use():
    net = encoder()
    params = problem(net, 3)
    data = padded_dataset()
    with pytest.raises(mnet.DataError, match="has mask_train but not the other split's"):
        mnet.fit(net, LOSS, params, dataclasses.replace(data, mask_test=None), epochs=1, batch_size=4)
    with pytest.raises(mnet.DataError, match=r"mask_test must be booleans of shape \(examples, T\) = \(4, 4\)"):
        mnet.fit(net, LOSS, params, dataclasses.replace(data, mask_test=data.mask_test[:, :2]), epochs=1, batch_size=4)
