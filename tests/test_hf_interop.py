"""A Hugging Face Llama checkpoint loads into our decoder with identical logits, and exports back."""
from __future__ import annotations

import json

import pytest
import torch

from infinipipe.contract.model_config import ModelConfig
from infinipipe.model.hf import (
    config_from_hf,
    config_to_hf,
    hf_to_ours,
    load_hf_checkpoint,
    load_hf_model,
    load_hf_stage,
    ours_to_hf,
    save_hf_checkpoint,
)
from infinipipe.model.layers import ChunkMeta
from infinipipe.model.stage import StageModel, init_weights

transformers = pytest.importorskip("transformers")

HF_SHAPE = dict(vocab_size=101, hidden_size=32, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=50000.0, max_position_embeddings=256)


def _hf_llama(tmp_path, seed=0, **over):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**HF_SHAPE, **over})
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1; random ones make the norm mapping matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path)
    return model


def _our_logits(cfg: ModelConfig, state: dict, seqs: list[torch.Tensor]) -> torch.Tensor:
    model = StageModel(cfg, range(cfg.layers), first=True, last=True, backend="naive").eval()
    model.load_state_dict(state)
    meta = ChunkMeta.build([len(s) for s in seqs], [0] * len(seqs))
    with torch.no_grad():
        h = model.embed_tokens(torch.cat(seqs))
        for layer in model.ordered_layers():
            h = layer(h, meta)
        return model.head(model.norm(h))


def _hf_logits(model, seqs: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(s[None]).logits[0] for s in seqs])


def _sequences(vocab: int, lengths=(17, 5, 30)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def test_llama_checkpoint_gives_transformers_logits(tmp_path):
    hf_model = _hf_llama(tmp_path)
    cfg, state = load_hf_checkpoint(tmp_path)
    assert cfg == ModelConfig(vocab_size=101, hidden=32, layers=3, heads=4, kv_heads=2, ffn=72,
                              rope_theta=50000.0, norm_eps=1e-6, tie_embeddings=False)
    seqs = _sequences(cfg.vocab_size)
    torch.testing.assert_close(_our_logits(cfg, state, seqs), _hf_logits(hf_model, seqs), atol=2e-5, rtol=1e-4)


def test_tied_llama_checkpoint_shares_head_and_embedding(tmp_path):
    hf_model = _hf_llama(tmp_path, seed=3, tie_word_embeddings=True)
    cfg, state = load_hf_checkpoint(tmp_path)
    assert cfg.tie_embeddings and state["head.weight"] is state["embed.weight"]
    seqs = _sequences(cfg.vocab_size, (9, 21))
    torch.testing.assert_close(_our_logits(cfg, state, seqs), _hf_logits(hf_model, seqs), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("shard_bytes", [2**30, 20_000])
def test_exported_checkpoint_loads_in_transformers_with_our_logits(tmp_path, shard_bytes):
    cfg = ModelConfig(vocab_size=67, hidden=32, layers=2, heads=4, kv_heads=1, ffn=48, rope_theta=20000.0)
    model = StageModel(cfg, range(cfg.layers), first=True, last=True)
    init_weights(model, seed=5)
    state = model.state_dict()
    save_hf_checkpoint(cfg, state, tmp_path, max_shard_bytes=shard_bytes)
    assert (tmp_path / "model.safetensors.index.json").is_file() == (shard_bytes < 2**30)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    seqs = _sequences(cfg.vocab_size, (12, 3))
    torch.testing.assert_close(_hf_logits(hf_model, seqs), _our_logits(cfg, state, seqs), atol=2e-5, rtol=1e-4)
    cfg2, state2 = load_hf_checkpoint(tmp_path)
    assert cfg2 == cfg and all(torch.equal(state2[k], v) for k, v in state.items())


def test_qwen2_checkpoint_with_qkv_biases_gives_transformers_logits(tmp_path):
    torch.manual_seed(4)
    hf_model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**HF_SHAPE)).eval()
    with torch.no_grad():  # HF initialises biases to 0; random ones make the bias mapping matter
        for name, p in hf_model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0.0, 0.1)
    hf_model.save_pretrained(tmp_path)
    cfg, state = load_hf_checkpoint(tmp_path)
    assert cfg.qkv_bias and "layers.2.wqkv.bias" in state
    seqs = _sequences(cfg.vocab_size)
    torch.testing.assert_close(_our_logits(cfg, state, seqs), _hf_logits(hf_model, seqs), atol=2e-5, rtol=1e-4)
    save_hf_checkpoint(cfg, state, tmp_path / "export")
    again = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "export").eval()
    torch.testing.assert_close(_hf_logits(again, seqs), _our_logits(cfg, state, seqs), atol=2e-5, rtol=1e-4)


def test_parameter_names_map_both_ways():
    for ours in ["embed.weight", "norm.weight", "head.weight", "layers.12.wqkv.weight", "layers.0.w_down.weight",
                 "layers.3.attn_norm.weight", "layers.3.mlp_norm.weight", "layers.5.w_gate_up.weight"]:
        assert all(hf_to_ours(hf) == ours for hf in ours_to_hf(ours))
    assert ours_to_hf("layers.7.w_gate_up.weight") == ("model.layers.7.mlp.gate_proj.weight",
                                                       "model.layers.7.mlp.up_proj.weight")
    assert ours_to_hf("layers.2.wqkv.bias") == tuple(f"model.layers.2.self_attn.{x}_proj.bias" for x in "qkv")
    with pytest.raises(ValueError, match="no counterpart"):
        hf_to_ours("model.layers.0.self_attn.q_norm.weight")
    with pytest.raises(ValueError, match="no Hugging Face counterpart"):
        ours_to_hf("layers.0.wq.weight")  # a name from before the projections were fused


def test_fused_projections_hold_the_checkpoints_tensors_stacked(tmp_path):
    _hf_llama(tmp_path)
    _, state = load_hf_checkpoint(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).state_dict()
    for ours, parts in (("layers.1.wqkv.weight", ("q", "k", "v")), ("layers.1.w_gate_up.weight", ("gate", "up"))):
        block = "self_attn" if "qkv" in ours else "mlp"
        torch.testing.assert_close(state[ours], torch.cat([hf[f"model.layers.1.{block}.{x}_proj.weight"]
                                                           for x in parts]), rtol=0, atol=0)


def test_config_round_trips_through_hf_json():
    cfg = ModelConfig(vocab_size=1000, hidden=64, layers=2, heads=8, kv_heads=2, ffn=128, rope_theta=5e5,
                      norm_eps=1e-5, tie_embeddings=True)
    assert config_from_hf(json.loads(json.dumps(config_to_hf(cfg)))) == cfg


@pytest.mark.parametrize("change, key", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "RoPE type 'llama3'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 16}, "head_dim"),
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
])
def test_configs_we_cannot_run_exactly_are_refused(change, key):
    hf = {**config_to_hf(ModelConfig(vocab_size=50, hidden=32, layers=1, heads=4, kv_heads=4, ffn=64)), **change}
    with pytest.raises(ValueError, match=key):
        config_from_hf(hf)


def test_missing_tensor_is_named(tmp_path):
    cfg = ModelConfig(vocab_size=50, hidden=32, layers=2, heads=4, kv_heads=4, ffn=64)
    model = StageModel(cfg, range(2), first=True, last=True)
    state = {k: v for k, v in model.state_dict().items() if k != "layers.1.wqkv.weight"}
    with pytest.raises(ValueError, match="layers.1.wqkv.weight"):
        save_hf_checkpoint(cfg, state, tmp_path)


def test_hf_stages_carry_the_folders_weights_and_chain_to_transformers_logits(tmp_path):
    hf_model = _hf_llama(tmp_path)
    stages = load_hf_model(tmp_path, (1, 2), dtype=torch.float32, backend="naive")
    seqs = _sequences(101)
    meta = ChunkMeta.build([len(s) for s in seqs], [0] * len(seqs))
    with torch.no_grad():
        h = stages[0].embed_tokens(torch.cat(seqs))
        for stage in stages:
            for layer in stage.ordered_layers():
                h = layer(h, meta)
        ours = stages[1].head(stages[1].norm(h))
    torch.testing.assert_close(ours, _hf_logits(hf_model, seqs), atol=2e-5, rtol=1e-4)
    assert load_hf_stage(tmp_path, (1, 2), 1, dtype=torch.bfloat16).norm.weight.dtype == torch.bfloat16


def test_a_stage_reads_only_the_shards_holding_its_own_layers(tmp_path):
    _hf_llama(tmp_path / "hf")
    cfg, state = load_hf_checkpoint(tmp_path / "hf")
    save_hf_checkpoint(cfg, state, tmp_path / "sharded", max_shard_bytes=20_000)
    weight_map = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    embed_file = weight_map["model.embed_tokens.weight"]
    assert all(f != embed_file for n, f in weight_map.items() if ".layers.2." in n or n.startswith("lm_head"))
    (tmp_path / "sharded" / embed_file).write_bytes(b"not safetensors")
    last = load_hf_stage(tmp_path / "sharded", (1, 2), 1)
    torch.testing.assert_close(last.head.weight, state["head.weight"])
    with pytest.raises(ValueError, match=f"{embed_file}: not a readable safetensors file"):
        load_hf_stage(tmp_path / "sharded", (1, 2), 0)


def test_a_missing_part_of_a_fused_projection_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _hf_llama(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_hf_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_hf_stage(tmp_path, (1, 2), 1)
