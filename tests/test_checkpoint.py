"""Checkpoints restore training exactly and are never left half-written."""
from __future__ import annotations

import pytest
import torch

from infinipipe.model.config import ModelConfig
from infinipipe.model.layers import ChunkMeta
from infinipipe.runtime.local import build_stages
from infinipipe.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

CFG = ModelConfig(vocab_size=50, hidden=16, layers=2, heads=2, kv_heads=1, ffn=32)


def _setup():
    (model,) = build_stages(CFG, [2], seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return model, opt, sched


def _step(model, opt, sched, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG.vocab_size, (9,), generator=g)
    h = model.embed(x)
    for layer in model.ordered_layers():
        h = layer(h, ChunkMeta.build([9], [0]))
    loss = model.head(model.norm(h)).logsumexp(-1).mean() + torch.rand(())
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def test_resumed_training_matches_uninterrupted(tmp_path):
    model, opt, sched = _setup()
    for s in range(3):
        _step(model, opt, sched, s)
    save_checkpoint(tmp_path, 3, model, opt, sched)
    rng_after_save = torch.get_rng_state()
    straight = [_step(model, opt, sched, s) for s in range(3, 6)]

    model2, opt2, sched2 = _setup()
    torch.manual_seed(12345)
    assert load_checkpoint(latest_checkpoint(tmp_path), model2, opt2, sched2) == 3
    assert torch.equal(torch.get_rng_state(), rng_after_save)
    resumed = [_step(model2, opt2, sched2, s) for s in range(3, 6)]
    assert resumed == straight
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_crash_mid_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = _setup()
    save_checkpoint(tmp_path, 1, model, opt, sched)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("torch.distributed.checkpoint.save", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, model, opt, sched)
    assert latest_checkpoint(tmp_path).name == "step-1"
    monkeypatch.undo()
    model2, opt2, sched2 = _setup()
    assert load_checkpoint(latest_checkpoint(tmp_path), model2, opt2, sched2) == 1


def test_keep_latest_k_prunes_old_checkpoints(tmp_path):
    model, opt, sched = _setup()
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, model, opt, sched, keep_latest_k=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-3", "step-4"]


def test_checkpoint_exports_to_a_hugging_face_folder_with_the_trained_weights(tmp_path):
    from infinipipe.model.hf import load_hf_checkpoint
    from infinipipe.train.checkpoint import export_hf

    model, opt, sched = _setup()
    _step(model, opt, sched, 0)
    save_checkpoint(tmp_path / "ckpt", 1, model, opt, sched)
    cfg, state = load_hf_checkpoint(export_hf(latest_checkpoint(tmp_path / "ckpt"), CFG, tmp_path / "hf"))
    assert cfg == CFG
    for name, p in model.state_dict().items():
        assert torch.equal(state[name], p), name
