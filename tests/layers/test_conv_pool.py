"""Conv2D, MaxPool2D, AvgPool2D and Reshape: forwards against jax.lax's own convolution and window reductions,
backwards against jax.vjp in float64 over random shapes, strides and paddings; a CNN with every derivative
function; bad configurations; and a CNN that learns the digits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnet
from mnet.core.walk import BACKWARD, walk
from mnet.errors import LayerError
from mnet.layers.windows import Geometry
from tests.helpers import (
    assert_trees_close,
    check_all,
    check_value_and_grad,
    no_autodiff,
    random_params,
    reference_norms,
    reference_per_example_grads,
)

PADDINGS = ["VALID", "SAME", 0, 1, 2, ((1, 0), (0, 2))]


def random_conv_cases(count, seed):
    """Seeded random (layer, example shape) pairs whose kernel fits the padded input."""
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        kernel = tuple(int(k) for k in rng.integers(1, 4, 2))
        stride = tuple(int(s) for s in rng.integers(1, 4, 2))
        padding = PADDINGS[rng.integers(len(PADDINGS))]
        shape = (int(rng.integers(1, 8)), int(rng.integers(1, 8)), int(rng.integers(1, 4)))
        layer = mnet.Conv2D(int(rng.integers(1, 5)), kernel, stride, padding, use_bias=bool(rng.integers(0, 4)))
        if Geometry.of(shape[:2], layer.kernel_size, layer.stride, layer.padding).problem() is None:
            cases.append((layer, shape))
    return cases


def lax_conv(layer, params, x):
    """The independent reference: XLA's convolution with the HWIO view of W."""
    (kh, kw), c_in = layer.kernel_size, x.shape[-1]
    pads = Geometry.of(x.shape[1:3], layer.kernel_size, layer.stride, layer.padding).pads
    y = jax.lax.conv_general_dilated(
        x,
        params["W"].reshape(kh, kw, c_in, layer.out_channels),
        layer.stride,
        pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + params["b"] if layer.use_bias else y


@jax.jit(static_argnums=0)
def backward_and_vjp(layer, params, x, dy):
    """The hand backward and jax.vjp's, in one compiled program per shape (eager JAX would compile every
    primitive separately, which dominates the cost of small random cases)."""
    y, cache = layer.forward(params, x)
    _, vjp = jax.vjp(layer.apply, params, x)
    return y, layer.backward(params, cache, dy), vjp(dy)


def check_against_vjp(layer, params, x, rng, rtol=1e-10):
    """Returns the layer's output after checking its backward against jax.vjp at a random cotangent."""
    dy = jnp.asarray(rng.normal(size=jax.eval_shape(layer.apply, params, x).shape))
    y, hand, reference = backward_and_vjp(layer, params, x, dy)
    assert_trees_close(hand, reference, rtol)
    return y


@pytest.mark.parametrize("seed", range(3))
def test_conv2d_forward_and_backward_on_random_geometries(seed):
    rng = np.random.default_rng(seed)
    for layer, shape in random_conv_cases(6, seed):
        out_shape, _ = layer.init(jax.random.key(0), shape)
        params = random_params(layer, shape, jnp.float64, rng)
        x = jnp.asarray(rng.normal(size=(2, *shape)))
        y = check_against_vjp(layer, params, x, rng)
        assert y.shape == (2, *out_shape), layer
        np.testing.assert_allclose(y, lax_conv(layer, params, x), rtol=1e-12, atol=1e-13, err_msg=repr(layer))


def test_conv2d_same_padding_keeps_the_size_and_its_layout_is_hwio():
    layer = mnet.Conv2D(4, (3, 2), padding="SAME")
    shape, params = layer.init(jax.random.key(0), (5, 7, 3), jnp.float64)
    assert shape == (5, 7, 4) and params["W"].shape == (3 * 2 * 3, 4)
    x = jax.random.normal(jax.random.key(1), (2, 5, 7, 3), jnp.float64)
    # One output entry by hand: window rows 0..2 (row -1 is padding), columns 3..4, every channel.
    kernel = params["W"].reshape(3, 2, 3, 4)
    padded = jnp.pad(x, ((0, 0), (1, 1), (0, 1), (0, 0)))
    by_hand = jnp.einsum("hwc,hwco->o", padded[1, 2:5, 3:5, :], kernel)
    np.testing.assert_allclose(layer.apply(params, x)[1, 2, 3], by_hand, rtol=1e-13)


def lax_max_pool(layer, x):
    pads = Geometry.of(x.shape[1:3], layer.window, layer.stride, layer.padding).pads
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, *layer.window, 1), (1, *layer.stride, 1), ((0, 0), *pads, (0, 0))
    )


def lax_avg_pool(layer, x):
    pads = ((0, 0), *Geometry.of(x.shape[1:3], layer.window, layer.stride, layer.padding).pads, (0, 0))
    window = lambda a: jax.lax.reduce_window(a, 0.0, jax.lax.add, (1, *layer.window, 1), (1, *layer.stride, 1), pads)  # noqa: E731
    counts = window(jnp.ones_like(x)) if not layer.count_include_pad else layer.window[0] * layer.window[1]
    return window(x) / counts


POOLS = [
    mnet.MaxPool2D(2),
    mnet.MaxPool2D(3, 1, "SAME"),
    mnet.MaxPool2D((2, 3), (1, 2), 1),
    mnet.MaxPool2D(3, 2, "SAME"),
    mnet.AvgPool2D(2),
    mnet.AvgPool2D(3, 1, "SAME"),
    mnet.AvgPool2D(3, 2, 1, count_include_pad=False),
    mnet.AvgPool2D((2, 3), 1, "SAME", count_include_pad=False),
]


@pytest.mark.parametrize("layer", POOLS, ids=repr)
def test_pools_against_lax_reduce_window_and_vjp(layer):
    rng = np.random.default_rng(0)
    reference = lax_max_pool if isinstance(layer, mnet.MaxPool2D) else lax_avg_pool
    for shape in [(4, 5, 2), (7, 6, 1), (3, 3, 3)]:
        x = jnp.asarray(rng.normal(size=(2, *shape)))
        out_shape, _ = layer.init(jax.random.key(0), shape)
        y = check_against_vjp(layer, (), x, rng)
        assert y.shape == (2, *out_shape)
        np.testing.assert_allclose(y, reference(layer, x), rtol=1e-13)
        # And against the gradient of the reference itself (XLA's select_and_scatter for max).
        dy = jnp.asarray(rng.normal(size=y.shape))
        hand, from_reference = jax.jit(
            lambda x, dy: (
                layer.backward((), layer.forward((), x)[1], dy)[1],
                jax.vjp(lambda x: reference(layer, x), x)[1](dy)[0],
            )
        )(x, dy)
        assert_trees_close(hand, from_reference, 1e-12)


def test_max_pool_ties_send_the_gradient_to_the_first_maximum():
    x = jnp.array([[3.0, 3.0], [1.0, 3.0]]).reshape(1, 2, 2, 1)
    layer = mnet.MaxPool2D(2)
    _, dx = layer.backward((), layer.forward((), x)[1], jnp.ones((1, 1, 1, 1)))
    np.testing.assert_array_equal(dx.reshape(2, 2), [[1.0, 0.0], [0.0, 0.0]])  # row-major first of the three
    _, vjp = jax.vjp(lambda x: lax_max_pool(layer, x), x)  # XLA's select_and_scatter picks the same one
    np.testing.assert_array_equal(vjp(jnp.ones((1, 1, 1, 1)))[0], dx)
    # Integer-valued inputs make ties everywhere, overlapping windows included.
    x = jnp.asarray(np.random.default_rng(1).integers(0, 3, (2, 6, 5, 2)), jnp.float64)
    overlapping = mnet.MaxPool2D(3, 1, "SAME")
    dy = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 5, 2)))
    _, vjp = jax.vjp(lambda x: lax_max_pool(overlapping, x), x)
    assert_trees_close(overlapping.backward((), overlapping.forward((), x)[1], dy)[1], vjp(dy)[0], 1e-13)


CNN = mnet.serial(
    mnet.Reshape((6, 6, 1)),
    mnet.Conv2D(3, 3, padding="SAME"),
    mnet.Relu(),
    mnet.MaxPool2D(2),
    mnet.residual(mnet.serial(mnet.Conv2D(3, 2, padding="SAME"), mnet.Tanh())),
    mnet.parallel(mnet.Conv2D(2, 1), mnet.AvgPool2D(3, 1, "SAME")),
    mnet.LayerNorm(),
    mnet.Dropout(0.2),
    mnet.Conv2D(4, 2, stride=2, padding=1),
    mnet.Flatten(),
    mnet.Dense(3),
)


def cnn_problem(dtype=jnp.float64, batch=4):
    rng = np.random.default_rng(0)
    params = random_params(CNN, (36,), dtype, rng)
    return params, jnp.asarray(rng.normal(size=(batch, 36)), dtype), jnp.asarray(rng.integers(0, 3, batch))


@pytest.mark.parametrize("train", [False, True])
def test_cnn_value_and_grad_against_autodiff(train):
    params, x, y = cnn_problem()
    check_value_and_grad(
        CNN, mnet.losses.softmax_cross_entropy, params, x, y, 1e-12, key=jax.random.key(3), train=train
    )


def test_cnn_float32_and_report():
    params, x, y = cnn_problem(jnp.float32)
    loss = mnet.losses.softmax_cross_entropy
    assert_trees_close(
        jax.jit(mnet.value_and_grad(CNN, loss))(params, x, y),
        jax.jit(mnet.autodiff_value_and_grad(CNN, loss))(params, x, y),
    )
    report = mnet.compare_gradients(CNN, loss, *cnn_problem())
    assert report.ok, report
    # One row per unit: the residual's and the parallel's blocks are opened (a Conv2D is checked whole).
    assert [row.position for row in report.layers] == [
        "[0]",
        "[1]",
        "[2]",
        "[3]",
        "[4][0][0]",
        "[4][0][1]",
        "[5][0]",
        "[5][1]",
        "[6]",
        "[7]",
        "[8]",
        "[9]",
        "[10]",
    ]


def test_cnn_derivatives():
    """Per-example gradients and norms (conv norms by the im2col Gram form or by building dW_b, whichever is
    cheaper; both occur here), DP clipping, the Jacobian and the NTK."""
    params, x, y = cnn_problem()
    check_all((CNN, mnet.losses.softmax_cross_entropy, params, x, y), 1e-9, jit=True)


def test_conv_norms_by_both_forms():
    """A wide conv on a small image takes the Gram form, a narrow one on a larger image builds dW_b."""
    rng = np.random.default_rng(4)
    for net, shape in [
        (mnet.serial(mnet.Conv2D(40, 2), mnet.Flatten(), mnet.Dense(2)), (3, 3, 8)),
        (mnet.serial(mnet.Conv2D(2, 3), mnet.Flatten(), mnet.Dense(2)), (9, 9, 1)),
    ]:
        params = random_params(net, shape, jnp.float64, rng)
        x = jnp.asarray(rng.normal(size=(3, *shape)))
        t = jnp.asarray(rng.normal(size=(3, 2)))
        expected = jax.jit(reference_per_example_grads, static_argnums=(0, 1))(net, mnet.losses.mse, params, x, t)
        norms = jax.jit(mnet.per_example_grad_norms(net, mnet.losses.mse))(params, x, t)
        assert_trees_close(norms, reference_norms(expected, 3), 1e-10)


def test_bad_configurations_are_named_at_init():
    with pytest.raises(
        LayerError,
        match=r"Conv2D\(4, \(5, 5\)\) at position \[1\].*kernel \(5, 5\) is larger than "
        r"the padded input \(4, 4\).*input shape \(4, 4, 1\)",
    ):
        mnet.serial(mnet.Reshape((4, 4, 1)), mnet.Conv2D(4, 5)).init(jax.random.key(0), (16,))
    mnet.Conv2D(4, 5, padding=1).init(jax.random.key(0), (4, 4, 1))  # padded to 6x6: fits
    with pytest.raises(
        LayerError, match=r"Conv2D\(4, \(3, 3\)\) at position \[0\].*\(height, width, channels\), got \(64,\)"
    ):
        mnet.serial(mnet.Conv2D(4, 3)).init(jax.random.key(0), (64,))
    with pytest.raises(LayerError, match=r"MaxPool2D\(\(3, 3\)\).*larger than the padded input \(2, 2\)"):
        mnet.MaxPool2D(3).init(jax.random.key(0), (2, 2, 1))
    with pytest.raises(LayerError, match=r"NHWC input .* got shape \(2, 8, 8\)"):
        mnet.Conv2D(2, 3).apply(mnet.Conv2D(2, 3).init(jax.random.key(0), (8, 8, 1))[1], jnp.ones((2, 8, 8)))
    with pytest.raises(LayerError, match=r"expects W of shape .* = \(18, 2\) for input \(2, 8, 8, 2\), got \(9, 2\)"):
        mnet.Conv2D(2, 3).apply(mnet.Conv2D(2, 3).init(jax.random.key(0), (8, 8, 1))[1], jnp.ones((2, 8, 8, 2)))
    with pytest.raises(LayerError, match=r"Reshape\(\(8, 8, 1\)\).*\(63,\) \(63 entries\) to \(8, 8, 1\)"):
        mnet.Reshape((8, 8, 1)).init(jax.random.key(0), (63,))
    for bad in [dict(kernel_size=0), dict(stride=(1, 0)), dict(padding="FULL"), dict(padding=-1)]:
        with pytest.raises(ValueError, match="Conv2D: "):
            mnet.Conv2D(2, **{"kernel_size": 3, **bad})
    with pytest.raises(ValueError, match="padding .* must be smaller than the window"):
        mnet.MaxPool2D(2, padding=2)


def test_cnn_learns_the_digits():
    """The experiment's network, hand-derived gradients: at least 98% test accuracy (20 epochs, a few seconds)."""
    net = mnet.models.digits_cnn()
    _, params = net.init(jax.random.key(0), (64,), jnp.float32)
    history = mnet.fit(net, mnet.losses.softmax_cross_entropy, params, mnet.data.load_digits(0), epochs=20).history
    assert history.test_accuracy[-1] >= 0.98


@pytest.mark.parametrize(
    "image, kernel, pads",
    [((8, 8), (2, 2), ((0, 0), (0, 0))), ((7, 9), (2, 3), ((1, 0), (0, 2))), ((5, 5), (3, 3), ((1, 1), (1, 1)))],
)
def test_tiling_windows_are_the_strided_slices_and_col2im_their_transpose(image, kernel, pads):
    """Windows that tile the image (stride = window) take the reshape-and-transpose path: ``im2col`` equals the
    strided slices cut one offset at a time by ``lax.slice``, and ``col2im`` is its transpose by ``jax.vjp``
    (uncovered rows and columns, here odd sizes and padding, get no gradient)."""
    from mnet.layers.windows import col2im, im2col, tiles

    g = Geometry.of(image, kernel, kernel, pads)
    assert tiles(g)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, *image, 3)))
    padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    (oh, ow), (kh, kw) = g.out, kernel
    slices = [
        padded[:, u : u + kh * (oh - 1) + 1 : kh, v : v + kw * (ow - 1) + 1 : kw, :]
        for u in range(kh)
        for v in range(kw)
    ]
    np.testing.assert_array_equal(im2col(x, g), jnp.stack(slices, axis=3))
    cols = jnp.asarray(rng.normal(size=(2, oh, ow, kh * kw, 3)))
    _, transpose = jax.vjp(lambda image_: im2col(image_, g), x)
    np.testing.assert_allclose(col2im(cols, g), transpose(cols)[0], rtol=1e-14, atol=1e-14)


def inner_walk_cotangent(layer, params, cache, dy):
    """The input cotangent as the inner network's own walk computes it: the window gradient ``dy W^T`` and
    ``col2im``."""
    return walk(layer.network(cache), BACKWARD, layer.to_network(params), (cache,), (dy,))[1][0]


def fused_and_inner_cotangents(layer, params, x, dy):
    """``(input_cotangent, the inner walk's)`` for the cotangents ``dy`` (any leading axes), from one forward."""
    _, cache = layer.forward(params, x)
    inner = functools.partial(inner_walk_cotangent, layer, params, cache)
    for _ in range(dy.ndim - cache[0].ndim):
        inner = jax.vmap(inner)
    return layer.input_cotangent(params, cache, dy), inner(dy)


def test_the_input_cotangent_is_one_transposed_convolution_equal_to_the_inner_walk():
    """For the quantities that carry cotangents, Conv2D hands its input cotangent down as one transposed convolution
    (``input_cotangent``) instead of the window gradient and ``col2im``: for a stack of columns on random
    geometries (strides, every padding) it equals the inner network's own walk and ``jax.vjp``, in float64 and
    without autodiff; under a policy it runs in the compute dtype, as the inner walk does; a float64 cotangent on
    float32 weights is promoted, as the inner walk's product promotes it."""
    rng = np.random.default_rng(7)
    cases = []
    for layer, shape in random_conv_cases(8, 7):
        params = random_params(layer, shape, jnp.float64, rng)
        x = jnp.asarray(rng.normal(size=(3, *shape)))
        stack = jnp.asarray(rng.normal(size=(4, *jax.eval_shape(layer.apply, params, x).shape)))
        cases.append((layer, params, x, stack))
    with no_autodiff():  # compiled under the guard, one program per geometry
        hand = [jax.jit(functools.partial(fused_and_inner_cotangents, case[0]))(*case[1:]) for case in cases]

    def vjp_of_each(layer, params, x, stack):
        return jax.vmap(lambda dy: jax.vjp(functools.partial(layer.apply, params), x)[1](dy)[0])(stack)

    for (layer, *arrays), (fused, inner) in zip(cases, hand):
        reference = jax.jit(functools.partial(vjp_of_each, layer))(*arrays)
        np.testing.assert_allclose(fused, inner, rtol=1e-12, atol=1e-12, err_msg=repr(layer))
        np.testing.assert_allclose(fused, reference, rtol=1e-12, atol=1e-12, err_msg=repr(layer))
    for layer, dtype, dy_dtype, expected, tolerance in (
        (
            mnet.Conv2D(4, 3, 2, "SAME", policy=mnet.Policy("bfloat16", output_dtype="float32")),
            jnp.float32,
            jnp.float32,
            jnp.bfloat16,
            2e-2,
        ),
        (mnet.Conv2D(4, 3, padding="SAME"), jnp.float32, jnp.float64, jnp.float64, 1e-12),
    ):
        _, params = layer.init(jax.random.key(0), (9, 9, 3), dtype)
        x = jax.random.normal(jax.random.key(1), (2, 9, 9, 3), dtype)
        dy = jnp.asarray(rng.normal(size=jax.eval_shape(layer.apply, params, x).shape), dy_dtype)
        fused, inner = jax.jit(functools.partial(fused_and_inner_cotangents, layer))(params, x, dy)
        assert fused.dtype == inner.dtype == expected
        np.testing.assert_allclose(fused.astype(jnp.float64), inner.astype(jnp.float64), rtol=tolerance, atol=tolerance)
