"""Atomic, verified, resumable checkpoints with ``torch.distributed.checkpoint`` (DCP).

Every rank writes its own shards into ``step-N.tmp``; once all have finished, the ranks hash the
files (each a share) and rank 0 writes ``manifest.json`` (size and sha256 of every file) into the
folder, renames it to ``step-N`` and then replaces the ``latest`` pointer, each an atomic
filesystem operation. A crash at any moment leaves the last good checkpoint untouched
(multi-node runs need the folder on a shared filesystem). Parameters and optimizer state are
keyed by fully qualified parameter names (flattened optimizer state), so pipeline stages never
collide and data-parallel replicas are written once.

Resuming checks the manifest first: a damaged checkpoint is named with its bad file, set aside as
``damaged-step-N`` and the next older one is tried. Checkpoints newer than the one resumed from
(``checkpoint.load_step``) are set aside as ``superseded-step-N``: nothing is deleted unasked.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .notices import warn

_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
LATEST = "latest"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from, named with the reason."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _union(items: list) -> list:
    """Every rank's ``items``, concatenated in rank order (on every rank)."""
    if not dist.is_initialized():
        return items
    gathered: list = [None] * _world()
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _state(model, optimizer, scheduler, step: int) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    return {
        "model": model_sd,
        "optim": optim_sd,
        "scheduler": {"last_epoch": scheduler.last_epoch},
        "train": {"step": step},
        "rng": {f"rank{_rank()}": torch.get_rng_state()},
    }


def _write_manifest(folder: Path, step: int) -> None:
    """Hash the checkpoint's files (each rank a share); rank 0 writes the manifest atomically."""
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    mine = [(n, (folder / n).stat().st_size, _sha256(folder / n)) for n in names[_rank()::_world()]]
    entries = _union(mine)
    if _rank() == 0:
        files = {n: {"bytes": size, "sha256": digest} for n, size, digest in sorted(entries)}
        tmp = folder / f"{MANIFEST}.tmp"
        tmp.write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
        os.replace(tmp, folder / MANIFEST)


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
    _write_manifest(tmp, step)
    if _rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _point_latest(folder, final)
        if keep_latest_k > 0:
            done = sorted(checkpoint_steps(folder).items())
            for _, old in done[:-keep_latest_k]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _point_latest(folder: Path, checkpoint: Path) -> None:
    pointer = folder / f"{LATEST}.tmp"
    pointer.write_text(checkpoint.name + "\n")
    os.replace(pointer, folder / LATEST)


def checkpoint_steps(folder: str | Path) -> dict[int, Path]:
    """Finished checkpoints in ``folder`` by step (``step-N``; not ``.tmp`` or set-aside ones)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found = {int(m.group(1)): p for p in folder.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))}
    return dict(sorted(found.items()))


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or the newest ``step-N`` when the pointer is missing or bad."""
    folder = Path(folder)
    pointer = folder / LATEST
    steps = checkpoint_steps(folder)
    newest = steps[max(steps)] if steps else None
    if not pointer.exists():
        return newest
    name = pointer.read_bytes().decode("utf-8", errors="replace").strip()
    if _STEP_DIR.fullmatch(name) and (folder / name).is_dir():
        return folder / name
    if _rank() == 0:
        shown = name if len(name) <= 40 and name.isprintable() else f"{len(name)} unreadable characters"
        warn(f"checkpoint pointer {pointer} holds {shown!r}, not a checkpoint folder; "
             f"using the newest one, {newest.name if newest else 'none'}")
    return newest


def checkpoint_problems(path: str | Path) -> list[str]:
    """How the files of checkpoint ``path`` differ from its manifest (empty: intact).

    Each rank hashes a share of the files; every rank returns the same list. Collective: all
    ranks call it for the same path.
    """
    path = Path(path)
    manifest = path / MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
        names = sorted(files)
        expected = [(n, int(files[n]["bytes"]), str(files[n]["sha256"])) for n in names]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return _union([f"{manifest}: no readable manifest ({type(exc).__name__}: {exc})"] if _rank() == 0 else [])
    problems = []
    for name, size, digest in expected[_rank()::_world()]:
        file = path / name
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif (got := file.stat().st_size) != size:
            problems.append(f"{file}: {got} bytes, the manifest says {size}")
        elif _sha256(file) != digest:
            problems.append(f"{file}: contents differ from the manifest's sha256")
    return _union(problems)


def _set_aside(path: Path, label: str) -> Path:
    """Rename checkpoint ``path`` to ``LABEL-step-N`` (numbered if taken), out of resume's sight."""
    target = path.with_name(f"{label}-{path.name}")
    n = 1
    while target.exists():
        target = path.with_name(f"{label}-{path.name}.{n}")
        n += 1
    os.replace(path, target)
    return target


def resume_checkpoint(folder: str | Path, model, optimizer, scheduler, load_step: int = -1) -> tuple[int, Path | None]:
    """Load the newest intact checkpoint in ``folder`` (or ``step-{load_step}``).

    Returns the completed step count and the folder loaded (``0, None`` when there is none). A
    damaged checkpoint is named and set aside, and the next older one tried; a chosen
    ``load_step`` that is missing or damaged is an error, as is a folder with no intact one.
    """
    folder = Path(folder)
    steps = checkpoint_steps(folder)
    if load_step > 0:
        if load_step not in steps:
            have = ", ".join(map(str, steps)) or "none"
            raise CheckpointError(f"checkpoint.load_step = {load_step}: no {folder / f'step-{load_step}'} "
                                  f"(checkpoints there: {have})")
        candidates = [load_step]
    else:
        candidates = sorted(steps, reverse=True)
    damaged = []
    for step in candidates:
        path = steps[step]
        problems = checkpoint_problems(path)
        if not problems:
            break
        if load_step > 0:
            raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(problems)}")
        damaged.append(step)
        if _rank() == 0:
            aside = _set_aside(path, "damaged")
            warn(f"checkpoint {path} is damaged ({'; '.join(problems)}); set aside as {aside.name}, "
                 f"falling back to an older checkpoint")
        _barrier()
    else:
        if damaged:
            raise CheckpointError(f"no intact checkpoint in {folder}: every one was damaged (set aside as "
                                  f"damaged-step-N); disable checkpoint.enable or use another run directory "
                                  f"to start over")
        return 0, None
    if _rank() == 0:
        for newer in (s for s in steps if s > step and s not in damaged):
            aside = _set_aside(steps[newer], "superseded")
            warn(f"resuming from {path.name}: the newer checkpoint {steps[newer].name} is set aside as {aside.name}")
        _point_latest(folder, path)
    _barrier()
    return load_checkpoint(path, model, optimizer, scheduler), path


def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> int:
    """Restore model, optimizer, scheduler and this rank's RNG; returns the completed step count."""
    state = _state(model, optimizer, scheduler, 0)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_OPTIONS)
    scheduler.last_epoch = state["scheduler"]["last_epoch"]
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    torch.set_rng_state(state["rng"][f"rank{_rank()}"])
    return int(state["train"]["step"])


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export_hf(path: str | Path, model_cfg, out: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write a training checkpoint's weights (all stages) as a Hugging Face checkpoint folder,
    with the Hugging Face tokenizer files of ``tokenizer`` (a ``tokenizer.json`` or its folder)
    beside them when given. Files get ordinary permissions (0644), as any model folder has."""
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
    if tokenizer is not None:
        source = Path(tokenizer)
        file = source / "tokenizer.json" if source.is_dir() else source
        shutil.copyfile(file, out / "tokenizer.json")
        for name in TOKENIZER_FILES[1:]:
            if (file.parent / name).is_file():
                shutil.copyfile(file.parent / name, out / name)
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)
    return out
