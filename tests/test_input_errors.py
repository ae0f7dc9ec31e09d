"""A damaged input file is named in the error it causes."""
from __future__ import annotations

import pytest
import torch

from infinipipe.config import load_config
from infinipipe.contract.model_config import ModelConfig
from infinipipe.data.corpus import TextCorpus
from infinipipe.data.dataset import tokenize_corpus
from infinipipe.data.tokenizer import HFTokenizer, load_tokenizer
from infinipipe.model.hf import load_hf_checkpoint, read_hf_config, save_hf_checkpoint
from infinipipe.runtime.local import build_stages
from infinipipe.train.planning import profile_for

GARBAGE = b"\x00\xffnot what it should be{"
CFG = ModelConfig(vocab_size=50, hidden=16, layers=2, heads=2, kv_heads=1, ffn=32)


def _hf_folder(tmp_path):
    (model,) = build_stages(CFG, [2], seed=1)
    save_hf_checkpoint(CFG, model.state_dict(), tmp_path)
    return tmp_path


def test_garbage_hf_config_is_named(tmp_path):
    (tmp_path / "config.json").write_bytes(GARBAGE)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'}: not a JSON config"):
        read_hf_config(tmp_path)


def test_garbage_safetensors_shard_is_named(tmp_path):
    folder = _hf_folder(tmp_path)
    (shard,) = folder.glob("*.safetensors")
    shard.write_bytes(GARBAGE)
    with pytest.raises(ValueError, match=rf"{shard}: not a readable safetensors file"):
        load_hf_checkpoint(folder, torch.float32)


def test_garbage_tokenizer_file_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(GARBAGE)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'tokenizer.json'}: not a Hugging Face tokenizer file"):
        HFTokenizer(tmp_path)


def test_garbage_token_cache_is_named_with_the_way_out(tmp_path):
    (tmp_path / "doc.txt").write_text("some text to tokenize")
    corpus, tokenizer = TextCorpus(tmp_path / "doc.txt"), load_tokenizer("cl100k_base")
    tokenize_corpus(corpus, tokenizer, tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("tokens-*.npz")
    cache.write_bytes(GARBAGE)
    with pytest.raises(ValueError, match=rf"{cache}: unreadable token cache .* delete it"):
        tokenize_corpus(corpus, tokenizer, tmp_path / "cache")


def test_garbage_profile_is_named(tmp_path):
    profile = tmp_path / "mine.json"
    profile.write_bytes(GARBAGE)
    cfg = load_config(None, [f"--epp.profile={profile}"])
    with pytest.raises(ValueError, match=rf"epp.profile '{profile}': not a readable profile"):
        profile_for(cfg, cfg.model_config())
