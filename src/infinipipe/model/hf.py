"""Hugging Face interop: read and write Llama-style checkpoint folders (config.json + safetensors).

Our decoder is the Llama architecture with HF's rotate-half RoPE layout, so weights move across
by renaming, with no permutation; our Q/K/V projection stacks HF's q/k/v_proj rows and our gate/up
projection its gate_proj and up_proj rows, so import joins them and export splits them. Only
``transformers``' file format is used here, not the library: loading needs ``safetensors`` and the
standard library, so a training node needs no ``transformers`` install. Anything our model cannot
represent exactly (RoPE scaling, biases, sliding windows, another activation) is refused with the
config key that asks for it, rather than loaded into a model that would compute something else.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..contract.model_config import ModelConfig
from .stage import StageModel

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")

# Each of our layer parameters and the HF tensors stacked (by rows, in this order) in it: Q/K/V are
# one projection here and gate/up another, so import joins them and export splits them.
_LAYER_PARTS = {
    "wqkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "wqkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "wo.weight": ("self_attn.o_proj.weight",),
    "w_gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "w_down.weight": ("mlp.down_proj.weight",),
    "attn_norm.weight": ("input_layernorm.weight",),
    "mlp_norm.weight": ("post_attention_layernorm.weight",),
}
_HF_TO_OURS_LAYER = {hf: ours for ours, parts in _LAYER_PARTS.items() for hf in parts}
_TOP_NAMES = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "head.weight"}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_OUR_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_OUR_TO_HF_TOP = {ours: hf for hf, ours in _TOP_NAMES.items()}


def hf_to_ours(name: str) -> str:
    """The parameter of ours that holds an HF tensor:
    ``model.layers.3.self_attn.k_proj.weight`` -> ``layers.3.wqkv.weight``."""
    m = _HF_LAYER.match(name)
    if m and m.group(2) in _HF_TO_OURS_LAYER:
        return f"layers.{m.group(1)}.{_HF_TO_OURS_LAYER[m.group(2)]}"
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    raise ValueError(f"checkpoint tensor {name!r} has no counterpart in our model")


def ours_to_hf(name: str) -> tuple[str, ...]:
    """The HF tensors stacked in one of our parameters, in row order:
    ``layers.3.w_gate_up.weight`` -> (``...mlp.gate_proj.weight``, ``...mlp.up_proj.weight``)."""
    m = _OUR_LAYER.match(name)
    if m and m.group(2) in _LAYER_PARTS:
        return tuple(f"model.layers.{m.group(1)}.{hf}" for hf in _LAYER_PARTS[m.group(2)])
    if name in _OUR_TO_HF_TOP:
        return (_OUR_TO_HF_TOP[name],)
    raise ValueError(f"parameter {name!r} has no Hugging Face counterpart")


def _rope_theta(hf: dict) -> float:
    """RoPE base from ``rope_parameters`` (transformers >= 5) or the older top-level keys."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(f"config.json: RoPE type {kind!r} is not supported (only plain RoPE)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict) -> ModelConfig:
    """Our ``ModelConfig`` from the contents of an HF ``config.json``; refuses what we cannot run."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"config.json: model_type {kind!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    if hf.get("mlp_bias") or hf.get("attention_bias"):
        raise ValueError("config.json: attention_bias / mlp_bias are not supported (our layers have no biases)")
    if hf.get("use_sliding_window"):
        raise ValueError("config.json: use_sliding_window is not supported (full causal attention only)")
    try:
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        cfg = ModelConfig(
            vocab_size=int(hf["vocab_size"]), hidden=hidden, layers=int(hf["num_hidden_layers"]), heads=heads,
            kv_heads=int(hf.get("num_key_value_heads") or heads), ffn=int(hf["intermediate_size"]),
            rope_theta=_rope_theta(hf), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=kind == "qwen2")
    except KeyError as exc:
        raise ValueError(f"config.json: missing key {exc.args[0]!r}") from None
    if hf.get("head_dim") not in (None, cfg.head_dim):
        raise ValueError(f"config.json: head_dim {hf['head_dim']} != hidden_size / num_attention_heads "
                         f"({cfg.head_dim}) is not supported")
    return cfg


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32, max_position_embeddings: int = 8192) -> dict:
    """An HF ``config.json`` for a ``LlamaForCausalLM`` with our shape."""
    return {
        "architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
        "model_type": "qwen2" if cfg.qkv_bias else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden, "intermediate_size": cfg.ffn,
        "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "max_position_embeddings": max_position_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch."),
    }


def read_hf_config(path: str | Path) -> ModelConfig:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"model.hf_path: no config.json in {str(path)!r}")
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{file}: not a JSON config ({exc})") from None
    return config_from_hf(obj)


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint of ``cfg`` and its shape."""
    d, kv, q = cfg.hidden, cfg.kv_dim, cfg.heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,),
              "lm_head.weight": (cfg.vocab_size, d)}
    for i in range(cfg.layers):
        layer = {"self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
                 "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
                 "mlp.gate_proj.weight": (cfg.ffn, d), "mlp.up_proj.weight": (cfg.ffn, d),
                 "mlp.down_proj.weight": (d, cfg.ffn), "input_layernorm.weight": (d,),
                 "post_attention_layernorm.weight": (d,)}
        if cfg.qkv_bias:
            layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
        shapes.update({f"model.layers.{i}.{n}": shape for n, shape in layer.items()})
    return shapes


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameters and their shapes: a fused one stacks its parts' rows."""
    hf = _hf_shapes(cfg)
    ours = {hf_to_ours(n) for n in hf}
    return {n: (sum(hf[p][0] for p in ours_to_hf(n)), *hf[ours_to_hf(n)[0]][1:]) for n in sorted(ours)}


def _join(cfg: ModelConfig, tensors: dict[str, torch.Tensor], names: Iterable[str], where: str,
          dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Our parameters ``names`` from HF ``tensors``, stacking the parts of a fused one; a missing or
    misshapen HF tensor is named."""
    shapes = _hf_shapes(cfg)
    state = {}
    for name in names:
        parts = ours_to_hf(name)
        missing = [p for p in parts if p not in tensors]
        if missing:
            raise ValueError(f"{where}: missing tensor(s) {missing[:5]}")
        for p in parts:
            if tuple(tensors[p].shape) != shapes[p]:
                raise ValueError(f"{where}: {p} has shape {tuple(tensors[p].shape)}, expected {shapes[p]}")
        joined = tensors[parts[0]] if len(parts) == 1 else torch.cat([tensors[p] for p in parts])
        state[name] = joined if dtype is None else joined.to(dtype)
    return state


def _check_state(cfg: ModelConfig, state: dict[str, torch.Tensor], where: str) -> None:
    shapes = _expected_shapes(cfg)
    missing = sorted(set(shapes) - set(state))
    extra = sorted(set(state) - set(shapes))
    if missing or extra:
        raise ValueError(f"{where}: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{where}: {name} has shape {tuple(state[name].shape)}, expected {shape}")


def _shard_files(path: Path, names: set[str] | None = None) -> list[Path]:
    """The safetensors files of a folder; with an index and ``names`` (HF names), only the files
    that hold them."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({exc!r})") from None
        files = weight_map.values() if names is None else [weight_map[n] for n in names if n in weight_map]
        return [path / f for f in sorted(set(files))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"model.hf_path: no model.safetensors or model.safetensors.index.json in "
                            f"{str(path)!r} (only safetensors checkpoints are read)")


def load_hf_checkpoint(path: str | Path,
                       dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, full-model state dict in our parameter names) from an HF checkpoint folder.

    With tied embeddings, ``head.weight`` is the same tensor as ``embed.weight``, as in a tied
    ``StageModel``'s own state dict. ``dtype`` casts every tensor (default: as stored).
    """
    path = Path(path)
    cfg = read_hf_config(path)
    tensors: dict[str, torch.Tensor] = {}
    for f in _shard_files(path):
        try:
            found = load_file(str(f))
        except Exception as exc:  # safetensors raises its own error type for a bad header or size
            raise ValueError(f"{f}: not a readable safetensors file ({exc})") from None
        for name, tensor in found.items():
            if not name.endswith("rotary_emb.inv_freq"):
                hf_to_ours(name)  # refuses a tensor our model has no place for
                tensors[name] = tensor
    if cfg.tie_embeddings and "model.embed_tokens.weight" in tensors:
        head = tensors.get("lm_head.weight")
        if head is not None and not torch.equal(head, tensors["model.embed_tokens.weight"]):
            raise ValueError(f"{path}: tie_word_embeddings is set but lm_head.weight differs from embed_tokens")
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    state = _join(cfg, tensors, _expected_shapes(cfg), str(path), dtype)
    if cfg.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    _check_state(cfg, state, str(path))
    return cfg, state


def read_hf_tensors(path: str | Path, names: Iterable[str],
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors ``names`` (our parameter names) from an HF checkpoint folder, and only those.

    Safetensors files are opened lazily, so a pipeline stage reads its own layers' bytes and not
    the whole checkpoint. With tied embeddings ``head.weight`` is read from the embedding. Every
    tensor is checked against the shape the folder's config.json implies; ``dtype`` casts.
    """
    path = Path(path)
    cfg = read_hf_config(path)
    wanted = set(names)
    unknown = sorted(wanted - set(_expected_shapes(cfg)))
    if unknown:
        raise ValueError(f"{path}: the model of config.json has no parameter(s) {unknown[:5]}")
    source = {n: "embed.weight" if cfg.tie_embeddings and n == "head.weight" else n for n in wanted}
    needed = {hf for n in source.values() for hf in ours_to_hf(n)}
    found: dict[str, torch.Tensor] = {}
    for f in _shard_files(path, needed):
        try:
            with safe_open(str(f), framework="pt") as shard:
                for name in set(shard.keys()) & needed:
                    found[name] = shard.get_tensor(name)
        except (OSError, SafetensorError) as exc:
            raise ValueError(f"{f}: not a readable safetensors file ({exc})") from None
    joined = _join(cfg, found, set(source.values()), str(path), dtype)
    return {name: joined[src] for name, src in source.items()}


def load_hf_stage(path: str | Path, layers_per_stage: Sequence[int], stage: int,
                  dtype: torch.dtype = torch.float32, backend: str = "auto") -> StageModel:
    """Pipeline stage ``stage`` of the HF model in ``path`` with its weights, reading only them."""
    cfg = read_hf_config(path)
    if sum(layers_per_stage) != cfg.layers or min(layers_per_stage) < 1:
        raise ValueError(f"layers_per_stage {tuple(layers_per_stage)} must be >= 1 each and sum to the "
                         f"{cfg.layers} layers of {path}")
    if not 0 <= stage < len(layers_per_stage):
        raise ValueError(f"stage {stage} is not one of the {len(layers_per_stage)} stages")
    lo = sum(layers_per_stage[:stage])
    model = StageModel(cfg, range(lo, lo + layers_per_stage[stage]), first=stage == 0,
                       last=stage == len(layers_per_stage) - 1, backend=backend).to(dtype)
    model.load_state_dict(read_hf_tensors(path, model.state_dict(), dtype))
    return model


def load_hf_model(path: str | Path, layers_per_stage: Sequence[int], dtype: torch.dtype = torch.float32,
                  backend: str = "auto") -> list[StageModel]:
    """Every pipeline stage of the HF model in ``path``, each with its own weights."""
    return [load_hf_stage(path, layers_per_stage, s, dtype, backend) for s in range(len(layers_per_stage))]


def save_hf_checkpoint(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], path: str | Path,
                       max_shard_bytes: int = 5 * 2**30, max_position_embeddings: int = 8192) -> None:
    """Write ``config.json`` and safetensors shards (with an index when more than one) to ``path``.

    ``state_dict`` is the full model in our names (stages' state dicts merged). Tied embeddings
    are written once, as HF does. Shards are filled in parameter order up to ``max_shard_bytes``.
    """
    _check_state(cfg, state_dict, "state_dict")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shapes = _hf_shapes(cfg)
    tensors = {}
    for k, v in state_dict.items():
        if cfg.tie_embeddings and k == "head.weight":
            continue
        parts = ours_to_hf(k)
        pieces = v.detach().to("cpu").split([shapes[p][0] for p in parts]) if len(parts) > 1 else (v.detach().to("cpu"),)
        tensors.update({p: piece.contiguous() for p, piece in zip(parts, pieces)})
    dtype = state_dict["embed.weight"].dtype
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype, max_position_embeddings), indent=2) + "\n",
                                      encoding="utf-8")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    index = path / "model.safetensors.index.json"
    if len(shards) == 1:
        index.unlink(missing_ok=True)
        save_file(shards[0], str(path / "model.safetensors"), metadata=meta)
        return
    (path / "model.safetensors").unlink(missing_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index.write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n", encoding="utf-8")
