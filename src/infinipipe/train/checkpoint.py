"""Atomic, verified, resumable checkpoints with ``torch.distributed.checkpoint`` (DCP).

Every rank writes its own shards into ``step-N.tmp``; once all have finished, the ranks hash the
files (each a share) and rank 0 writes ``manifest.json`` (size and sha256 of every file) into the
folder, renames it to ``step-N`` and then replaces the ``latest`` pointer, each an atomic
filesystem operation. A crash at any moment leaves the last good checkpoint untouched
(multi-node runs need the folder on a shared filesystem). Parameters and optimizer state are
keyed by fully qualified parameter names (flattened optimizer state), so pipeline stages never
collide and data-parallel replicas are written once.

Each checkpoint also holds the job's ``config.toml`` (what export reads: the run directory's copy
follows the newest job, which may train another model) and the manifest names the run it belongs
to, so a resumed job's metrics continue that run's rows and no other's.

Resuming checks the manifest first: a damaged checkpoint is named with its bad file, set aside as
``damaged-step-N`` and the next older one is tried. Checkpoints newer than the one resumed from
(``checkpoint.load_step``) are set aside as ``superseded-step-N``: nothing is deleted unasked. A job
with another parallel layout than the writer's loads it resharded: state is keyed by parameter
name, and a rank the writer did not have keeps its own random state.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import resource
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .notices import warn

_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
LATEST = "latest"
MANIFEST = "manifest.json"
CONFIG = "config.toml"
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from, named with the reason."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (a full disk, a file-size limit); the last good one is kept."""


@dataclass(frozen=True)
class CheckpointJob:
    """Who writes a checkpoint: the run it continues (``run`` tags its metrics rows too) and the
    job's config as TOML text."""

    run: str
    config_toml: str


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


def _state(model, optimizer, scheduler, step: int, with_rng: bool = True) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    return {
        "model": model_sd,
        "optim": optim_sd,
        "scheduler": {"last_epoch": scheduler.last_epoch},
        "train": {"step": step},
        "rng": {f"rank{_rank()}": torch.get_rng_state()} if with_rng else {},
    }


def _write_manifest(folder: Path, step: int, run: str | None) -> None:
    """Hash the checkpoint's files (each rank a share); rank 0 writes the manifest atomically."""
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    mine = [(n, (folder / n).stat().st_size, _sha256(folder / n)) for n in names[_rank()::_world()]]
    entries = _union(mine)
    if _rank() == 0:
        files = {n: {"bytes": size, "sha256": digest} for n, size, digest in sorted(entries)}
        tmp = folder / f"{MANIFEST}.tmp"
        head = {"step": step, "run": run} if run else {"step": step}
        tmp.write_text(json.dumps({**head, "files": files}, indent=1) + "\n")
        os.replace(tmp, folder / MANIFEST)


def save_checkpoint(folder: str | Path, step: int, model, optimizer, scheduler, keep_latest_k: int = 0,
                    job: CheckpointJob | None = None) -> Path:
    """Write the state after ``step`` completed steps; returns the final folder.

    A failed write raises `CheckpointWriteError` on every rank DCP told of it, naming the
    checkpoint and the operating system's reason, not the storage library's symptom.
    """
    folder = Path(folder)
    final, tmp = folder / f"step-{step}", folder / f"step-{step}.tmp"
    try:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
        _barrier()
        dcp.save(_state(model, optimizer, scheduler, step), checkpoint_id=str(tmp))
        if _rank() == 0 and job is not None:
            (tmp / CONFIG).write_text(job.config_toml)
        _barrier()
        _write_manifest(tmp, step, job.run if job else None)
        if _rank() == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _point_latest(folder, final)
    except (Exception, CheckpointException) as exc:  # DCP's exception is a BaseException
        raise _write_failure(final, tmp, exc) from exc
    if _rank() == 0:
        if keep_latest_k > 0:
            done = sorted(checkpoint_steps(folder).items())
            for _, old in done[:-keep_latest_k]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _write_failure(final: Path, tmp: Path, exc: BaseException) -> CheckpointWriteError:
    """The error a failed write is reported as: DCP's per-rank failures name the ranks whose own
    write failed, and the OS reason is read off the exception or, where the storage layer hid it
    (a short write shows as "unexpected pos"), off the limits that cause one."""
    failures = getattr(exc, "failures", None) or {}
    causes = [exc] + [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    where = f" (the write failed on rank {', '.join(map(str, sorted(failures)))})" if failures else ""
    return CheckpointWriteError(f"cannot write checkpoint {final}{where}: {_os_reason(tmp, causes)}; "
                                f"the last good checkpoint is kept")


def _os_reason(tmp: Path, causes: list[BaseException]) -> str:
    err = next((e for e in _chain(causes) if isinstance(e, OSError) and e.errno), None)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and (err.errno == errno.EFBIG if err else _largest_file(tmp) >= limit):
        return f"{os.strerror(errno.EFBIG)}: this process may write files of at most {limit} bytes (ulimit -f)"
    if err is not None:
        return f"{os.strerror(err.errno)}" + (f" ({err.filename})" if err.filename else "")
    free = shutil.disk_usage(tmp.parent if tmp.parent.exists() else Path.cwd()).free
    if free < 2**26:
        return f"{os.strerror(errno.ENOSPC)}: {free:,} bytes free in {tmp.parent}"
    last = causes[-1]
    text = str(last).strip()
    return f"{type(last).__name__}: {text.splitlines()[-1] if text else 'no message'}"


def _chain(causes: list[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for cause in causes:
        while cause is not None and cause not in out:
            out.append(cause)
            cause = cause.__cause__ or cause.__context__
    return out


def _largest_file(folder: Path) -> int:
    return max((p.stat().st_size for p in folder.rglob("*") if p.is_file()), default=0) if folder.is_dir() else 0


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


def checkpoint_problems(path: str | Path, hash_files: bool = True) -> list[str]:
    """How the files of checkpoint ``path`` differ from its manifest (empty: intact).

    Each rank hashes a share of the files; every rank returns the same list. Collective: all
    ranks call it for the same path. ``hash_files=False`` checks names and sizes only (what the
    launching process can afford before the ranks start).
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
        elif hash_files and _sha256(file) != digest:
            problems.append(f"{file}: contents differ from the manifest's sha256")
    return _union(problems)


def missing_load_step(folder: Path, load_step: int, steps: dict[int, Path]) -> CheckpointError:
    have = ", ".join(map(str, steps)) or "none"
    return CheckpointError(f"checkpoint.load_step = {load_step}: no {folder / f'step-{load_step}'} "
                           f"(checkpoints there: {have})")


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
            raise missing_load_step(folder, load_step, steps)
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
        _warn_bad_pointer(folder, path)
        _point_latest(folder, path)
    _barrier()
    return load_checkpoint(path, model, optimizer, scheduler), path


def _warn_bad_pointer(folder: Path, resumed: Path) -> None:
    """Say so before resume rewrites a ``latest`` that named no checkpoint folder."""
    pointer = folder / LATEST
    if not pointer.exists():
        return
    name = pointer.read_bytes().decode("utf-8", errors="replace").strip()
    if not _STEP_DIR.fullmatch(name):
        shown = name if len(name) <= 40 and name.isprintable() else f"{len(name)} unreadable characters"
        warn(f"checkpoint pointer {pointer} held {shown!r}, not a checkpoint folder; rewritten to {resumed.name}")


def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> int:
    """Restore model, optimizer, scheduler and this rank's RNG; returns the completed step count.

    The RNG is restored where the writer had this rank; a rank it did not have (a job resumed
    with more ranks) keeps its own.
    """
    try:
        own_rng = f"rng.rank{_rank()}" in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        state = _state(model, optimizer, scheduler, 0, with_rng=own_rng)
        dcp.load(state, checkpoint_id=str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_OPTIONS)
    scheduler.last_epoch = state["scheduler"]["last_epoch"]
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    if own_rng:
        torch.set_rng_state(state["rng"][f"rank{_rank()}"])
    return int(state["train"]["step"])


def saved_ranks(path: str | Path) -> int:
    """How many ranks wrote checkpoint ``path`` (each saved its random state)."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return sum(1 for key in saved if key.startswith("rng.rank"))


def checkpoint_run(path: str | Path) -> str | None:
    """The run a checkpoint belongs to (its manifest's ``run``), or None for one written before runs were named."""
    try:
        run = json.loads((Path(path) / MANIFEST).read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return run if isinstance(run, str) else None


def checkpoint_config(path: str | Path) -> str | None:
    """The config (TOML text) the job that wrote ``path`` ran with, or None for an older checkpoint."""
    file = Path(path) / CONFIG
    return file.read_text() if file.is_file() else None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export_hf(path: str | Path, model_cfg, out: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write a training checkpoint's weights (all stages) as a Hugging Face checkpoint folder,
    with the Hugging Face tokenizer files of ``tokenizer`` (a ``tokenizer.json`` or its folder)
    beside them when given. Files get ordinary permissions (0644), as any model folder has.

    Only the model's tensors are read: a checkpoint's other entries are pickled objects, which
    could run code when loaded, and a checkpoint may come from elsewhere.
    """
    from ..model.hf import save_hf_checkpoint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in saved.items()
             if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    if not state:
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    with warnings.catch_warnings():  # that one process reads it is the point, not news to the user
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    save_hf_checkpoint(model_cfg, {key.removeprefix("model."): t for key, t in state.items()}, out)
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


def intact_checkpoint(folder: str | Path) -> Path | None:
    """The newest checkpoint in ``folder`` whose files match its manifest (read only: a damaged
    one is named in a warning and passed over, not set aside); None when there is none."""
    steps = checkpoint_steps(folder)
    for step in sorted(steps, reverse=True):
        problems = checkpoint_problems(steps[step])
        if not problems:
            return steps[step]
        warn(f"checkpoint {steps[step]} is damaged ({'; '.join(problems)}); trying an older one")
    return None
