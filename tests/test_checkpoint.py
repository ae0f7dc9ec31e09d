"""Checkpoints restore training exactly and are never left half-written."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from infinipipe.contract.model_config import ModelConfig
from infinipipe.model.layers import ChunkMeta
from infinipipe.runtime.local import build_stages
from infinipipe.train.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    latest_checkpoint,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)

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


def _saved(tmp_path, steps):
    """Checkpoints after each step in ``steps``."""
    model, opt, sched = _setup()
    for step in range(1, max(steps) + 1):
        _step(model, opt, sched, step)
        if step in steps:
            save_checkpoint(tmp_path, step, model, opt, sched)


def test_manifest_records_size_and_sha256_of_every_checkpoint_file(tmp_path):
    _saved(tmp_path, (1,))
    manifest = json.loads((tmp_path / "step-1" / "manifest.json").read_text())
    files = {p.name for p in (tmp_path / "step-1").iterdir() if p.name != "manifest.json"}
    assert set(manifest["files"]) == files and ".metadata" in files
    for name, entry in manifest["files"].items():
        data = (tmp_path / "step-1" / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _shard(ckpt: Path) -> Path:
    return next(p for p in ckpt.iterdir() if p.suffix == ".distcp")


@pytest.mark.parametrize("damage, says", [
    ("truncate", "bytes, the manifest says"),
    ("flip", "contents differ from the manifest's sha256"),
    ("manifest", "no readable manifest"),
])
def test_damaged_newest_checkpoint_is_named_set_aside_and_resume_falls_back(tmp_path, capsys, damage, says):
    model, opt, sched = _setup()
    _step(model, opt, sched, 1)
    save_checkpoint(tmp_path, 1, model, opt, sched)
    straight = [_step(model, opt, sched, s) for s in (2, 3)]
    save_checkpoint(tmp_path, 3, model, opt, sched)
    shard = _shard(tmp_path / "step-3")
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        (tmp_path / "step-3" / "manifest.json").write_text("{not json")

    model2, opt2, sched2 = _setup()
    start, path = resume_checkpoint(tmp_path, model2, opt2, sched2)
    assert (start, path.name) == (1, "step-1")
    err = capsys.readouterr().err
    assert f"checkpoint {tmp_path / 'step-3'} is damaged" in err and says in err
    assert damage == "manifest" or shard.name in err
    assert "falling back to an older checkpoint" in err
    assert (tmp_path / "damaged-step-3").is_dir() and latest_checkpoint(tmp_path).name == "step-1"
    assert [_step(model2, opt2, sched2, s) for s in (2, 3)] == straight


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    _saved(tmp_path, (1,))
    _shard(tmp_path / "step-1").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no intact checkpoint in"):
        resume_checkpoint(tmp_path, *_setup())


def test_garbage_latest_pointer_falls_back_to_the_newest_step_folder(tmp_path, capsys):
    _saved(tmp_path, (1, 2))
    (tmp_path / "latest").write_bytes(bytes(range(256)))
    assert latest_checkpoint(tmp_path).name == "step-2"
    assert "not a checkpoint folder; using the newest one, step-2" in capsys.readouterr().err
    start, _ = resume_checkpoint(tmp_path, *_setup())
    assert start == 2 and (tmp_path / "latest").read_text() == "step-2\n"


def test_load_step_resumes_from_the_chosen_checkpoint_and_sets_newer_ones_aside(tmp_path, capsys):
    _saved(tmp_path, (1, 2))
    start, path = resume_checkpoint(tmp_path, *_setup(), load_step=1)
    assert (start, path.name) == (1, "step-1")
    assert (tmp_path / "superseded-step-2").is_dir() and not (tmp_path / "step-2").exists()
    assert "the newer checkpoint step-2 is set aside as superseded-step-2" in capsys.readouterr().err


def test_load_step_of_a_missing_or_damaged_checkpoint_is_an_error_naming_it(tmp_path):
    _saved(tmp_path, (1, 2))
    with pytest.raises(CheckpointError, match=r"load_step = 5: no .*step-5 \(checkpoints there: 1, 2\)"):
        resume_checkpoint(tmp_path, *_setup(), load_step=5)
    _shard(tmp_path / "step-1").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"step-1 is damaged: .*\.distcp: 7 bytes"):
        resume_checkpoint(tmp_path, *_setup(), load_step=1)


@pytest.mark.parametrize("overrides, message", [
    (["--checkpoint.enable=true", "--checkpoint.load_step=0"], "checkpoint.load_step"),
    (["--checkpoint.enable=false", "--checkpoint.load_step=3"], "checkpoint.load_step needs checkpoint.enable = true"),
])
def test_load_step_setting_is_validated(overrides, message):
    from infinipipe.config import load_config

    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_export_copies_the_runs_tokenizer_and_writes_ordinary_file_modes(tmp_path):
    import stat

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from infinipipe.train.checkpoint import export_hf

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["def f(x): return x + 1"] * 20, trainers.BpeTrainer(vocab_size=60,
                                                                               special_tokens=["<unk>", "</s>"]))
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    model, opt, sched = _setup()
    save_checkpoint(tmp_path / "ckpt", 1, model, opt, sched)
    out = export_hf(latest_checkpoint(tmp_path / "ckpt"), CFG, tmp_path / "hf", tmp_path / "tok")
    assert Tokenizer.from_file(str(out / "tokenizer.json")).to_str() == tok.to_str()
    assert (out / "tokenizer_config.json").read_text() == '{"eos_token": "</s>"}'
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


def test_a_rank_the_checkpoint_has_no_random_state_for_resumes_from_its_weights(tmp_path, monkeypatch):
    """A job with more ranks than the one that wrote the checkpoint (a larger pipeline degree)
    reshards by parameter name; the new ranks keep their own random state."""
    _saved(tmp_path, (1,))
    monkeypatch.setattr("infinipipe.train.checkpoint._rank", lambda: 3)
    model, opt, sched = _setup()
    rng = torch.get_rng_state()
    start, _ = resume_checkpoint(tmp_path, model, opt, sched)
    assert start == 1 and torch.equal(torch.get_rng_state(), rng)


def test_failed_checkpoint_write_names_the_checkpoint_its_path_and_the_os_error(tmp_path):
    import resource

    model, opt, sched = _setup()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(CheckpointWriteError) as info:
            save_checkpoint(tmp_path, 1, model, opt, sched)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(info.value)
    assert f"cannot write checkpoint {tmp_path / 'step-1'}" in message
    assert "File too large" in message and "4096" in message
    assert latest_checkpoint(tmp_path) is None


def test_resume_says_so_when_it_rewrites_a_garbage_latest_pointer(tmp_path, capsys):
    _saved(tmp_path, (1,))
    (tmp_path / "latest").write_text("rubbish\n")
    resume_checkpoint(tmp_path, *_setup())
    assert (tmp_path / "latest").read_text() == "step-1\n"
    assert f"checkpoint pointer {tmp_path / 'latest'} held 'rubbish'" in capsys.readouterr().err


class _RunsCode:
    """An object that touches ``flag`` when unpickled: what a hostile checkpoint could hold."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return Path.touch, (self.flag,)


def test_export_reads_the_models_tensors_and_unpickles_nothing(tmp_path):
    import torch.distributed.checkpoint as dcp

    from infinipipe.model.hf import load_hf_checkpoint
    from infinipipe.train.checkpoint import export_hf

    model, _, _ = _setup()
    flag = tmp_path / "code-ran"
    dcp.save({"model": model.state_dict(), "extra": _RunsCode(flag)}, checkpoint_id=str(tmp_path / "ckpt"))
    _, state = load_hf_checkpoint(export_hf(tmp_path / "ckpt", CFG, tmp_path / "hf"))
    assert not flag.exists()
    assert all(torch.equal(state[name], p) for name, p in model.state_dict().items())


TINY_AS_CFG = ["--model.vocab_size=50", "--model.hidden=16", "--model.layers=2", "--model.heads=2",
               "--model.kv_heads=1", "--model.ffn=32", "--data.vocab_size=0"]


def test_export_cli_passes_over_a_damaged_newest_checkpoint_says_which_it_exported_and_reads_its_own_config(
        tmp_path, capsys, recwarn):
    from infinipipe.cli import main
    from infinipipe.config import load_config
    from infinipipe.model.hf import load_hf_checkpoint
    from infinipipe.train.checkpoint import CheckpointJob

    run = tmp_path / "run"
    job = CheckpointJob("run-a", load_config(None, TINY_AS_CFG).to_toml())
    model, opt, sched = _setup()
    save_checkpoint(run / "checkpoint", 1, model, opt, sched, job=job)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, opt, sched, 2)
    save_checkpoint(run / "checkpoint", 2, model, opt, sched, job=job)
    shard = _shard(run / "checkpoint" / "step-2")
    shard.write_bytes(shard.read_bytes()[:-1])
    # a later job in the same directory trained another model and rewrote the run's config
    (run / "config.toml").write_text(load_config(None, ["--model.layers=3"]).to_toml())

    recwarn.clear()
    assert main(["export-hf", str(run), "--out", str(tmp_path / "hf")]) == 0
    out, err = capsys.readouterr()
    assert f"checkpoint {run / 'checkpoint' / 'step-2'} is damaged" in err and "trying an older one" in err
    assert out == f"exported step-1 ({run / 'checkpoint' / 'step-1'}) to {tmp_path / 'hf'}\n"
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)], [str(w.message) for w in recwarn]
    _, state = load_hf_checkpoint(tmp_path / "hf")
    assert all(torch.equal(state[name], p) for name, p in first.items())

    chosen = run / "checkpoint" / "step-2"
    assert main(["export-hf", str(run), "--checkpoint", str(chosen), "--out", str(tmp_path / "hf2")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"infinipipe export-hf: error: checkpoint {chosen} is damaged: ")
