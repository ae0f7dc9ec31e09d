"""Atomic, resumable checkpoints with ``torch.distributed.checkpoint`` (DCP).

Every rank writes its own shards into ``step-N.tmp``; once all have finished, rank 0 renames the
folder to ``step-N`` and then replaces the ``latest`` pointer, each an atomic filesystem
operation. A crash at any moment leaves the last good checkpoint and its pointer untouched
(multi-node runs need the folder on a shared filesystem). Parameters and optimizer state are
keyed by fully qualified parameter names (flattened optimizer state), so pipeline stages never
collide and data-parallel replicas are written once.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
LATEST = "latest"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _state(model, optimizer, scheduler, step: int) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    return {
        "model": model_sd,
        "optim": optim_sd,
        "scheduler": {"last_epoch": scheduler.last_epoch},
        "train": {"step": step},
        "rng": {f"rank{_rank()}": torch.get_rng_state()},
    }


def save_checkpoint(folder: str | Path, step: int, model, optimizer, scheduler, keep_latest_k: int = 0) -> Path:
    """Write the state after ``step`` completed steps; returns the final folder."""
    folder = Path(folder)
    final, tmp = folder / f"step-{step}", folder / f"step-{step}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    _barrier()
    dcp.save(_state(model, optimizer, scheduler, step), checkpoint_id=str(tmp))
    _barrier()
    if _rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = folder / f"{LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, folder / LATEST)
        if keep_latest_k > 0:
            done = sorted((p for p in folder.glob("step-*") if not p.name.endswith(".tmp")),
                          key=lambda p: int(p.name.split("-")[1]))
            for old in done[:-keep_latest_k]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def latest_checkpoint(folder: str | Path) -> Path | None:
    pointer = Path(folder) / LATEST
    if not pointer.exists():
        return None
    path = Path(folder) / pointer.read_text().strip()
    if not path.is_dir():
        raise ValueError(f"checkpoint pointer {pointer} names {path.name}, which does not exist")
    return path


def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> int:
    """Restore model, optimizer, scheduler and this rank's RNG; returns the completed step count."""
    state = _state(model, optimizer, scheduler, 0)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_OPTIONS)
    scheduler.last_epoch = state["scheduler"]["last_epoch"]
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    torch.set_rng_state(state["rng"][f"rank{_rank()}"])
    return int(state["train"]["step"])


def export_hf(path: str | Path, model_cfg, out: str | Path) -> Path:
    """Write a training checkpoint's weights (all stages) as a Hugging Face checkpoint folder."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from ..model.hf import save_hf_checkpoint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    merged = out / "dcp-merged.pt.tmp"
    try:
        dcp_to_torch_save(str(path), str(merged))
        state = torch.load(merged, weights_only=False)["model"]
    finally:
        merged.unlink(missing_ok=True)
    save_hf_checkpoint(model_cfg, state, out)
    return out
