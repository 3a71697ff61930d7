"""LLaMA-style checkpoints with Hugging Face's tensor names to :func:`mnet.models.gpt` and back.

The names and what each becomes (``N`` a layer; every projection's ``W = weight.T``, PyTorch's ``(out, in)`` to
mnet's ``(in, out)``)::

    model.embed_tokens.weight                     (vocab, d)   the embedding's table as it is
    model.layers.N.input_layernorm.weight         (d,)         block N's attention RMSNorm gamma
    model.layers.N.self_attn.q_proj.weight        (h hd, d)    attention q; k_proj, v_proj (g hd, d); o_proj (d, h hd)
    model.layers.N.post_attention_layernorm.weight (d,)        block N's MLP RMSNorm gamma
    model.layers.N.mlp.gate_proj.weight           (f, d)       GatedMLP W_gate; up_proj (f, d) W_up; down_proj (d, f)
    model.norm.weight                             (d,)         the final RMSNorm
    lm_head.weight                                (vocab, d)   the read-out; absent: tied to the embedding

mnet's attention is Hugging Face's: rotate-half rotary positions, query head ``h`` reading key-value head
``h // (heads / kv_heads)`` (:mod:`mnet.layers.attention.heads`), softmax of ``q k^T / sqrt(hd)``; its RMSNorm is
``LlamaRMSNorm`` and its gated MLP ``down(silu(gate(x)) * up(x))``, so the weights need no permutation.

Shapes give the vocabulary, width, depth, key-value heads and MLP width; the number of query heads, the rotary base,
the RMSNorm epsilon and the context come from the arguments or from a Hugging Face ``config.json``
(``num_attention_heads``, ``rope_theta``, ``rms_norm_eps``, ``max_position_embeddings``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from mnet.errors import SettingError
from mnet.layers.combinators import Serial
from mnet.models import gpt
from mnet.training.checkpoint import atomic_write
from mnet.training.formats import DTYPE_OF_CODE

_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_BUFFERS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # older files keep the angles
_PROJECTIONS = ("q", "k", "v", "o")
_MLP = (("gate", "W_gate"), ("up", "W_up"), ("down", "W_down"))


def _read_tensors(source: Any) -> tuple[dict[str, np.ndarray], dict]:
    """The tensors (name to NumPy array) and the ``config.json`` (or ``{}``) of a file, a directory or a mapping."""
    if isinstance(source, Mapping):
        return {name: _numpy(value) for name, value in source.items()}, {}
    path = Path(source)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.exists() for f in files):
        raise SettingError(f"load_llama: {path}: no such safetensors file (or none in the directory)")
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    tensors = {}
    for file in files:
        try:
            for name, view in safetensors.deserialize(file.read_bytes()):
                dtype = jnp.dtype(DTYPE_OF_CODE[view["dtype"]])
                tensors[name] = np.frombuffer(view["data"], dtype).reshape(view["shape"])
        except (safetensors.SafetensorError, KeyError, ValueError) as error:
            raise SettingError(f"load_llama: {file}: not a readable safetensors file ({error})") from None
    return tensors, config


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; bfloat16 has no NumPy twin, float32 holds it exactly
        value = value.detach().cpu()
        value = value.float() if str(value.dtype) == "torch.bfloat16" else value
        return value.numpy()
    return np.asarray(value)


def _setting(name: str, given: Any, config: dict, key: str, default: Any = None) -> Any:
    value = given if given is not None else config.get(key, default)
    if value is None:
        raise SettingError(f"load_llama: {name} is not given and the checkpoint has no config.json {key!r}")
    return value


def load_llama(
    source: str | Path | Mapping[str, Any],
    *,
    num_heads: int | None = None,
    context: int | None = None,
    rope_base: float | None = None,
    eps: float | None = None,
    dtype: Any = None,
) -> tuple[Serial, tuple]:
    """A LLaMA-style checkpoint as :func:`mnet.models.gpt` and its params.

    Arguments:
        source: a ``.safetensors`` file, a directory of them (a sharded checkpoint, with its ``config.json``), or a
            mapping of the names above to arrays (NumPy, JAX or PyTorch tensors: a ``state_dict()``).
        num_heads: query heads (default: the config's ``num_attention_heads``).
        context: the longest sequence (default: the config's ``max_position_embeddings``, else 2048).
        rope_base: the rotary base (default: the config's ``rope_theta``, else 10000).
        eps: the RMSNorms' epsilon (default: the config's ``rms_norm_eps``, else 1e-6).
        dtype: the params' dtype (default: the tensors' own).

    Returns:
        ``(net, params)``: ``net.apply(params, ids)`` gives the next-token logits ``(batch, T, vocab)``.

    Raises:
        SettingError: a missing or unexpected tensor, a shape that does not fit, or rotary scaling or attention
            biases, which :func:`mnet.models.gpt` has not; the message names the tensor.
    """
    tensors, config = _read_tensors(source)
    if config.get("rope_scaling"):
        raise SettingError(f"load_llama: rope_scaling {config['rope_scaling']} is not mapped (plain rotary only)")
    heads = int(_setting("num_heads", num_heads, config, "num_attention_heads"))
    unknown = [n for n in tensors if _BUFFERS.fullmatch(n) is None and not _known(n)]
    if unknown:
        raise SettingError(f"load_llama: unexpected tensors {unknown[:5]} (attention biases or another architecture)")
    vocab, d_model = _take(tensors, "model.embed_tokens.weight").shape
    layers = 1 + max((int(m.group(1)) for n in tensors if (m := _LAYER.match(n))), default=-1)
    if layers == 0:
        raise SettingError("load_llama: the checkpoint has no tensor 'model.layers.0.*' (no decoder layer)")
    q, k = (_take(tensors, f"model.layers.0.self_attn.{p}_proj.weight") for p in "qk")
    if q.shape != (d_model, d_model) or d_model % heads:
        raise SettingError(
            f"load_llama: q_proj of shape {q.shape} with {heads} heads: gpt needs ({d_model}, {d_model})"
        )
    tied = "lm_head.weight" not in tensors
    net = gpt(
        vocab,
        int(_setting("context", context, config, "max_position_embeddings", 2048)),
        d_model,
        layers,
        heads,
        num_kv_heads=k.shape[0] // (d_model // heads),
        hidden=_take(tensors, "model.layers.0.mlp.gate_proj.weight").shape[0],
        rope_base=float(_setting("rope_base", rope_base, config, "rope_theta", 10000.0)),
        eps=float(_setting("eps", eps, config, "rms_norm_eps", 1e-6)),
        tie_embeddings=tied,
    )
    cast = lambda name, transpose=False: _cast(_take(tensors, name), dtype, transpose)  # noqa: E731
    blocks: list[tuple[dict, dict]] = []
    for n in range(layers):
        at = f"model.layers.{n}."
        attention = {p: {"W": cast(f"{at}self_attn.{p}_proj.weight", True)} for p in _PROJECTIONS}
        mlp = {ours: cast(f"{at}mlp.{theirs}_proj.weight", True) for theirs, ours in _MLP}
        blocks += [({"gamma": cast(f"{at}input_layernorm.weight")}, attention)]
        blocks += [({"gamma": cast(f"{at}post_attention_layernorm.weight")}, mlp)]
    embedding, norm = {"W": cast("model.embed_tokens.weight")}, {"gamma": cast("model.norm.weight")}
    if tied:
        params: tuple = ({"embedding": embedding, "body": (*blocks, norm)},)
    else:
        params = (embedding, *blocks, norm, {"W": cast("lm_head.weight", True)})
    _check_shapes(net, params)
    return net, params


def _known(name: str) -> bool:
    if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        return True
    rest = _LAYER.sub("", name, count=1) if _LAYER.match(name) else None
    layer_names = {f"self_attn.{p}_proj.weight" for p in _PROJECTIONS} | {f"mlp.{p}_proj.weight" for p, _ in _MLP}
    return rest in layer_names | {"input_layernorm.weight", "post_attention_layernorm.weight"}


def _take(tensors: dict, name: str) -> np.ndarray:
    if name not in tensors:
        raise SettingError(f"load_llama: the checkpoint has no tensor {name!r}")
    return tensors[name]


def _cast(array: np.ndarray, dtype: Any, transpose: bool) -> jnp.ndarray:
    array = array.T if transpose else array
    return jnp.asarray(array, dtype or array.dtype)


def _check_shapes(net: Serial, params: tuple) -> None:
    """Every tensor's shape against the one ``gpt`` expects (a layer of another width is named, not broadcast)."""
    expected = jax.eval_shape(lambda: net.init(jax.random.key(0), (1,))[1])
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(expected)):
        if got.shape != want.shape:
            where = jax.tree_util.keystr(path)
            raise SettingError(f"load_llama: params{where} would have shape {got.shape}, gpt expects {want.shape}")


def _unpacked(params: Any) -> tuple[dict, list, dict, dict | None]:
    """The embedding, the blocks' ``(attention norm, attention, MLP norm, MLP)``, the final norm and the read-out
    (None when tied) of :func:`mnet.models.gpt`'s params."""
    try:
        if len(params) == 1 and isinstance(params[0], dict):  # tied: ({"embedding", "body"},)
            embedding, body, head = params[0]["embedding"], params[0]["body"], None
        else:
            embedding, body, head = params[0], params[1:-1], params[-1]
        *blocks, norm = body
        pairs = [(blocks[i][0], blocks[i][1], blocks[i + 1][0], blocks[i + 1][1]) for i in range(0, len(blocks), 2)]
        shaped = [
            set(embedding) == {"W"} and set(norm) == {"gamma"} and (head is None or set(head) == {"W"}),
            *(set(a) == set(_PROJECTIONS) and set(m) == {ours for _, ours in _MLP} for _, a, _, m in pairs),
            *(set(n1) == set(n2) == {"gamma"} for n1, _, n2, _ in pairs),
        ]
        if len(blocks) % 2 or not all(shaped):
            raise ValueError
        return embedding, pairs, norm, head
    except (TypeError, ValueError, KeyError, IndexError):
        raise SettingError("export_llama: params are not those of mnet.models.gpt (without attention biases)") from None


def export_llama(params: Any) -> dict[str, np.ndarray]:
    """:func:`mnet.models.gpt`'s params under Hugging Face's LLaMA names, as NumPy arrays in PyTorch's layout
    (``weight = W.T``; fresh, writable copies): what ``LlamaForCausalLM.load_state_dict`` takes (a tied model has no ``lm_head.weight``).

    Arguments:
        params: the params of a ``gpt`` (untied or ``tie_embeddings=True``), without attention biases.

    Returns:
        A dict of tensor names to arrays; :func:`save_llama` writes it as safetensors.
    """
    embedding, blocks, norm, head = _unpacked(params)
    out = {"model.embed_tokens.weight": np.array(embedding["W"])}
    for n, (attention_norm, attention, mlp_norm, mlp) in enumerate(blocks):
        at = f"model.layers.{n}."
        out[f"{at}input_layernorm.weight"] = np.array(attention_norm["gamma"])
        for p in _PROJECTIONS:
            # order="C": safetensors writes the array's memory as it lies, and a transposed copy keeps Fortran order
            out[f"{at}self_attn.{p}_proj.weight"] = np.array(np.asarray(attention[p]["W"]).T, order="C")
        out[f"{at}post_attention_layernorm.weight"] = np.array(mlp_norm["gamma"])
        for theirs, ours in _MLP:
            out[f"{at}mlp.{theirs}_proj.weight"] = np.array(np.asarray(mlp[ours]).T, order="C")
    out["model.norm.weight"] = np.array(norm["gamma"])
    if head is not None:
        out["lm_head.weight"] = np.array(np.asarray(head["W"]).T, order="C")
    return out


def save_llama(path: str | Path, params: Any) -> None:
    """Write :func:`export_llama`'s tensors to ``path`` as safetensors, atomically (``load_llama`` reads it back;
    so do ``safetensors.torch.load_file`` and Hugging Face's loaders with the model's ``config.json``).

    Arguments:
        path: the destination file; parent directories are created.
        params: the params of a :func:`mnet.models.gpt`.
    """
    data = safetensors.numpy.save(export_llama(params), metadata={"format": "pt"})
    atomic_write(path, lambda file: file.write(data))
