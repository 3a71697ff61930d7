"""from_torch: a torch.nn.Sequential becomes an mnet network with the same outputs and the same gradients as
PyTorch's autograd (float64, 1e-10), for every mapped layer; an unmapped layer is refused by name."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnet
from mnet.interop import UnsupportedLayer, from_torch
from tests.helpers import assert_trees_close, no_autodiff, reference_norms, reference_per_example_grads

torch = pytest.importorskip("torch", reason="the PyTorch bridge needs torch (pip install mnet[bridges])")
nn = torch.nn


def mlp():
    return nn.Sequential(
        nn.Linear(5, 7),
        nn.ReLU(),
        nn.Linear(7, 6, bias=False),
        nn.Tanh(),
        nn.LayerNorm(6),
        nn.GELU(),
        nn.Linear(6, 6),
        nn.GELU(approximate="tanh"),
        nn.Sequential(nn.SiLU(), nn.ELU(0.7), nn.LeakyReLU(0.1), nn.Softplus(), nn.Sigmoid(), nn.Identity()),
        nn.RMSNorm(6, eps=1e-5),
        nn.Dropout(0.3),
        nn.Linear(6, 4),
        nn.Softmax(dim=-1),
    )


def cnn():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0)),
        nn.Tanh(),
        nn.AvgPool2d(2, stride=1, padding=1),
        nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
        nn.Flatten(),
        nn.Linear(4 * 3 * 4, 5),
    )


def tokens():
    return nn.Sequential(nn.Embedding(9, 4), nn.LayerNorm(4), nn.Linear(4, 3))


CASES = {
    "mlp": (mlp, lambda g: torch.randn(3, 5, generator=g, dtype=torch.float64)),
    "cnn": (cnn, lambda g: torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64)),
    "tokens": (tokens, lambda g: torch.randint(0, 9, (3, 5), generator=g)),
}


def converted_grads(model):
    """The gradients autograd left on ``model``'s parameters, in mnet's layout: the same model with each weight
    replaced by its gradient, converted (the conversion is linear in every weight)."""
    grads = copy.deepcopy(model)
    for parameter, copied in zip(model.parameters(), grads.parameters()):
        copied.data = parameter.grad.clone()
    return from_torch(grads)[1]


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_equal_pytorchs(case):
    build, inputs = CASES[case]
    torch.manual_seed(0)
    model = build().double().eval()
    generator = torch.Generator().manual_seed(1)
    x = inputs(generator)
    y = model(x)
    cotangent = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    (y * cotangent).sum().backward()

    net, params = from_torch(model)
    x_jax = jnp.asarray(x.numpy())
    with no_autodiff():  # the converted network's forward and backward are the hand-derived ones
        out, cache = net.forward(params, x_jax)
        dparams, dx = net.backward(params, cache, jnp.asarray(cotangent.numpy()))
    np.testing.assert_allclose(np.asarray(out), y.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert_trees_close(dparams, converted_grads(model), 1e-10)
    if x.is_floating_point():
        x_grad = torch.autograd.grad((model(x.requires_grad_()) * cotangent).sum(), x)[0]
        np.testing.assert_allclose(np.asarray(dx), x_grad.numpy(), rtol=1e-10, atol=1e-12)


def test_the_converted_network_is_an_ordinary_mnet_network():
    torch.manual_seed(0)
    model = cnn().double()
    net, params = from_torch(model)
    x = jax.random.normal(jax.random.key(0), (4, 2, 8, 8))
    labels = jnp.arange(4) % 5
    loss = mnet.losses.softmax_cross_entropy
    value, grads = mnet.value_and_grad(net, loss)(params, x, labels)
    reference = jax.value_and_grad(lambda p: loss.value(net.forward(p, x)[0], labels))(params)
    np.testing.assert_allclose(value, reference[0], rtol=1e-12)
    assert_trees_close(grads, reference[1], 1e-10)
    norms = mnet.per_example_grad_norms(net, loss)(params, x, labels)
    expected = reference_norms(reference_per_example_grads(net, loss, params, x, labels), 4)
    np.testing.assert_allclose(norms, expected, rtol=1e-10)
    assert mnet.diag_ggn(net, loss)(params, x, labels)[1]["W"].shape == (3 * 3 * 2, 3)  # [0] is the Transpose


def test_the_layout_is_pytorchs_and_the_weights_mnets():
    net, params = from_torch(cnn())
    assert repr(net).startswith("serial(Transpose((1, 2, 0)), Conv2D(3, (3, 3), padding=((1, 1), (1, 1)))")
    assert "Transpose((2, 0, 1)), Flatten(), Dense(5)" in repr(net)
    assert params[1]["W"].shape == (3 * 3 * 2, 3) and params[-1]["W"].shape == (48, 5)


@pytest.mark.parametrize(
    "module, message",
    [
        (nn.Sequential(nn.Linear(3, 3), nn.Conv2d(3, 3, 3, dilation=2)), r"torch.Conv2d at model\[1\].*dilation"),
        (
            nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.ReLU(), nn.Hardswish())),
            r"torch.Hardswish at model\[1\]\[1\]",
        ),
        (nn.Sequential(nn.Flatten(start_dim=2)), r"torch.Flatten at model\[0\].*start_dim=1"),
        (nn.Sequential(nn.LayerNorm((3, 4))), r"torch.LayerNorm at model\[0\].*normalized_shape \(3, 4\)"),
        (nn.Sequential(nn.Softplus(beta=2.0)), r"torch.Softplus at model\[0\]"),
    ],
)
def test_an_unmapped_layer_is_named_with_its_position(module, message):
    with pytest.raises(UnsupportedLayer, match=message):
        from_torch(module)
    with pytest.raises(TypeError, match="from_torch: expects a torch.nn.Module, got list"):
        from_torch([nn.ReLU()])
