"""Per-step metrics: one JSON object per line, optionally mirrored to TensorBoard.

Rows are never lost without a word. Each row names its run (a fresh job starts one; a resumed job
continues its checkpoint's), and a resumed run keeps its own rows up to its resume step; when any
row would go (a fresh run in a used directory, a resume from an older checkpoint, rows another
run wrote since), the whole old file is first moved aside to ``metrics-<time>.jsonl`` and a
warning names it. A resume whose rows another run's file moved aside (a rerun with checkpoints
off in between) takes them back from the newest file aside that holds them, so ``metrics.jsonl``
is always the resumed run's whole history. Rows written before runs were named count as the
resumed run's in ``metrics.jsonl`` only (in a file aside they could be anyone's). A torn last
line (a crash mid-write) is dropped with a warning naming the file and line; a bad line anywhere
else is an error, since that is not what a crash leaves.
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from .notices import warn

METRICS = "metrics.jsonl"


def _rows(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The rows of ``path`` and whether a torn last line was dropped."""
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as exc:
            if number == len(lines):
                warn(f"{path}: line {number} is torn (an interrupted write); dropped it")
                return rows, True
            raise ValueError(f"{path}: line {number} is not a metrics row ({exc})") from None
        rows.append(row)
    return rows, False


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _own_rows_aside(path: Path, run: str, resume_step: int, have: set[int]) -> tuple[list[dict[str, Any]], list[Path]]:
    """Rows of ``run`` up to ``resume_step`` that files moved aside hold and ``have`` lacks (the
    newest file first wins a step), and the files they came from."""
    found: dict[int, dict[str, Any]] = {}
    sources = []
    for aside in sorted(path.parent.glob("metrics-*.jsonl"), key=lambda p: p.stat().st_mtime_ns, reverse=True):
        try:
            rows, _ = _rows(aside)
        except (OSError, ValueError):
            continue  # a file set aside that cannot be read is left as it is
        mine = [r for r in rows if r.get("run") == run and r["step"] <= resume_step
                and r["step"] not in have and r["step"] not in found]
        found.update((r["step"], r) for r in mine)
        if mine:
            sources.append(aside)
    return [found[s] for s in sorted(found)], sources


def _move_aside(path: Path) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"metrics-{stamp}.jsonl")
    n = 1
    while target.exists():
        target = path.with_name(f"metrics-{stamp}-{n}.jsonl")
        n += 1
    os.replace(path, target)
    return target


class MetricsWriter:
    """Appends to ``RUN_DIR/metrics.jsonl`` after the rows up to ``resume_step`` (see the module)."""

    def __init__(self, run_dir: str | Path, tensorboard_dir: str | Path | None = None, resume_step: int = 0,
                 run: str = ""):
        self.path = Path(run_dir) / METRICS
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run = run
        rows, torn = _rows(self.path) if self.path.exists() else ([], False)
        others = [r for r in rows if r.get("run", run) != run]
        kept = [r for r in rows if r["step"] <= resume_step and r.get("run", run) == run]
        restored, sources = (_own_rows_aside(self.path, run, resume_step, {r["step"] for r in kept})
                             if resume_step and run else ([], []))
        if rows:
            if len(kept) < len(rows):
                aside = _move_aside(self.path)
                if resume_step and others:
                    warn(f"resuming from step {resume_step}: {self.path} holds {len(others)} rows of another run; "
                         f"its {len(rows)} rows are kept in {aside}")
                else:
                    why = f"resuming from step {resume_step}" if resume_step else "a fresh run"
                    warn(f"{why} redoes steps logged in {self.path}; its {len(rows)} rows are kept in {aside}")
        if restored:
            warn(f"resuming from step {resume_step}: took this run's {len(restored)} earlier rows back into "
                 f"{self.path} from {', '.join(map(str, sources))}")
            kept = sorted(kept + restored, key=lambda r: r["step"])
        if torn or len(kept) < len(rows) or restored:
            _write_rows(self.path, kept)
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ValueError("metrics.enable_tensorboard needs the 'tensorboard' package installed") from exc
            self._tb = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        record = {**record, "run": self.run} if self.run else record
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        raise FileNotFoundError(f"no {METRICS} in {run_dir}")
    return _rows(path)[0]
