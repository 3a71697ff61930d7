"""load_llama / export_llama / save_llama: a LLaMA-style state dict with Hugging Face's names (random weights, built
here) loads into mnet.models.gpt and matches a reference forward written here in NumPy after Hugging Face's
modeling_llama (float64, 1e-10); the export gives the same names back, PyTorch's load_state_dict takes them, and
a wrong checkpoint is refused by tensor name."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import mnet
from mnet.errors import SettingError
from mnet.interop import export_llama, load_llama, save_llama
from tests.helpers import assert_trees_close

VOCAB, D, LAYERS, HEADS, KV_HEADS, HIDDEN = 11, 8, 2, 4, 2, 12
HEAD_DIM = D // HEADS


def state_dict(rng, tied=False):
    shapes = {"model.embed_tokens.weight": (VOCAB, D), "model.norm.weight": (D,)}
    for n in range(LAYERS):
        at = f"model.layers.{n}."
        shapes |= {
            f"{at}input_layernorm.weight": (D,),
            f"{at}self_attn.q_proj.weight": (HEADS * HEAD_DIM, D),
            f"{at}self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, D),
            f"{at}self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, D),
            f"{at}self_attn.o_proj.weight": (D, HEADS * HEAD_DIM),
            f"{at}post_attention_layernorm.weight": (D,),
            f"{at}mlp.gate_proj.weight": (HIDDEN, D),
            f"{at}mlp.up_proj.weight": (HIDDEN, D),
            f"{at}mlp.down_proj.weight": (D, HIDDEN),
        }
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, D)
    return {
        name: rng.normal(size=shape) / np.sqrt(shape[-1]) + (name.endswith("norm.weight"))
        for name, shape in shapes.items()
    }


def rms_norm(x, weight, eps):
    return weight * x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps)


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def reference_logits(sd, ids, theta=10000.0, eps=1e-6):
    """Hugging Face's LlamaForCausalLM forward (modeling_llama), written out in NumPy."""
    h = sd["model.embed_tokens.weight"][ids]
    batch, T = ids.shape
    inv_freq = 1.0 / theta ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    angles = np.concatenate([np.outer(np.arange(T), inv_freq)] * 2, axis=-1)  # (T, head_dim)
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
    causal = np.tril(np.ones((T, T), bool))
    for n in range(LAYERS):
        at = f"model.layers.{n}."
        x = rms_norm(h, sd[f"{at}input_layernorm.weight"], eps)
        q, k, v = (x @ sd[f"{at}self_attn.{p}_proj.weight"].T for p in "qkv")
        q = q.reshape(batch, T, HEADS, HEAD_DIM)
        k, v = (a.reshape(batch, T, KV_HEADS, HEAD_DIM) for a in (k, v))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = (np.repeat(a, HEADS // KV_HEADS, axis=2) for a in (k, v))  # repeat_kv
        scores = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(HEAD_DIM)
        scores = np.where(causal, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out = np.einsum("bhst,bthd->bshd", p, v).reshape(batch, T, -1)
        h = h + out @ sd[f"{at}self_attn.o_proj.weight"].T
        x = rms_norm(h, sd[f"{at}post_attention_layernorm.weight"], eps)
        gate, up = x @ sd[f"{at}mlp.gate_proj.weight"].T, x @ sd[f"{at}mlp.up_proj.weight"].T
        h = h + (gate / (1 + np.exp(-gate)) * up) @ sd[f"{at}mlp.down_proj.weight"].T
    h = rms_norm(h, sd["model.norm.weight"], eps)
    return h @ sd.get("lm_head.weight", sd["model.embed_tokens.weight"]).T


@pytest.mark.parametrize("tied", [False, True])
def test_a_llama_state_dict_is_a_gpt_with_the_same_logits(tied):
    sd = state_dict(np.random.default_rng(0), tied)
    net, params = load_llama(sd, num_heads=HEADS, context=16)
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 7))
    np.testing.assert_allclose(net.apply(params, jnp.asarray(ids)), reference_logits(sd, ids), rtol=1e-10, atol=1e-12)
    assert isinstance(net.layers[0], mnet.Tied) == tied
    exported = export_llama(params)
    assert sorted(exported) == sorted(sd)
    for name in sd:
        np.testing.assert_array_equal(exported[name], sd[name])


def test_a_checkpoint_directory_with_its_config_loads_and_saves_back(tmp_path):
    sd = state_dict(np.random.default_rng(2))
    config = {"num_attention_heads": HEADS, "rope_theta": 500.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 9}
    (tmp_path / "config.json").write_text(json.dumps(config))
    names = sorted(sd)  # two shards, as Hugging Face writes large checkpoints
    for index, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        safetensors.numpy.save_file({n: sd[n] for n in part}, tmp_path / f"model-0000{index + 1}-of-00002.safetensors")
    net, params = load_llama(tmp_path)
    ids = np.arange(9)[None] % VOCAB
    expected = reference_logits(sd, ids, theta=500.0, eps=1e-5)
    np.testing.assert_allclose(net.apply(params, jnp.asarray(ids)), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(mnet.LayerError, match="longer"):
        net.apply(params, jnp.zeros((1, 10), jnp.int32))
    save_llama(tmp_path / "out" / "model.safetensors", params)
    again = safetensors.numpy.load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(again) == names
    net_again, params_again = load_llama(
        tmp_path / "out" / "model.safetensors", num_heads=HEADS, rope_base=500.0, eps=1e-5
    )
    assert_trees_close(params_again, params, 0)


def test_pytorchs_load_state_dict_takes_the_saved_file(tmp_path):
    torch = pytest.importorskip("torch", reason="needs torch (pip install mnet[bridges])")
    import safetensors.torch

    nn = torch.nn
    sd = state_dict(np.random.default_rng(3))
    _, params = load_llama(sd, num_heads=HEADS)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(D), nn.RMSNorm(D)
            self.self_attn = nn.ModuleDict(
                {f"{p}_proj": nn.Linear(D, (HEADS if p in "qo" else KV_HEADS) * HEAD_DIM, bias=False) for p in "qkv"}
                | {"o_proj": nn.Linear(HEADS * HEAD_DIM, D, bias=False)}
            )
            self.mlp = nn.ModuleDict(
                {"gate_proj": nn.Linear(D, HIDDEN, bias=False), "up_proj": nn.Linear(D, HIDDEN, bias=False)}
                | {"down_proj": nn.Linear(HIDDEN, D, bias=False)}
            )

    model = nn.Module()
    model.model = nn.Module()
    model.model.embed_tokens, model.model.norm = nn.Embedding(VOCAB, D), nn.RMSNorm(D)
    model.model.layers = nn.ModuleList([Layer() for _ in range(LAYERS)])
    model.lm_head = nn.Linear(D, VOCAB, bias=False)
    save_llama(tmp_path / "model.safetensors", params)
    exported = safetensors.torch.load_file(tmp_path / "model.safetensors")
    model.double().load_state_dict(exported, strict=True)  # every name and shape is PyTorch's
    held = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    ids = np.arange(6)[None] % VOCAB
    net, _ = load_llama(sd, num_heads=HEADS)
    np.testing.assert_allclose(reference_logits(held, ids), net.apply(params, jnp.asarray(ids)), rtol=1e-10)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), "no tensor 'model.layers.1.mlp.up_proj.weight'"),
        (lambda sd: sd.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(D)}), "unexpected tensors"),
        (
            lambda sd: sd.update({"model.layers.1.mlp.down_proj.weight": np.zeros((D, HIDDEN + 1))}),
            r"params\[4\]\[1\]\['W_down'\] would have shape \(13, 8\), gpt expects \(12, 8\)",
        ),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_refused_by_tensor_name(edit, message):
    sd = state_dict(np.random.default_rng(4))
    edit(sd)
    with pytest.raises(SettingError, match=message):
        load_llama(sd, num_heads=HEADS)
    with pytest.raises(SettingError, match="num_heads is not given"):
        load_llama(state_dict(np.random.default_rng(4)))


def test_export_refuses_params_of_another_network():
    _, params = mnet.mlp([4, 3]).init(jax.random.key(0), (5,))
    with pytest.raises(SettingError, match="not those of mnet.models.gpt"):
        export_llama(params)
