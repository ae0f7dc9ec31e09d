"""Export a Plan's per-stage actions to `torch.distributed.pipelining`'s schedule notation.

One pipeline stage per rank, chunk ids as micro-batch indices: stage 1's forward of chunk 3 is
``1F3``. The compute-only CSV has one row per rank and one action per cell, the format
``_PipelineScheduleRuntime._load_csv`` reads. That notation has no place for chunk shapes or
recompute, so those stay in the Plan; the export is for reading and checking schedules with
torch's tools, not for running variable-length chunks there (its stages need equal shapes).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ..contract.ir import Plan, deferred_chunks


def pipelining_actions(plan: Plan) -> dict[int, list[str]]:
    """Rank -> ordered action strings (``"0F3"``, ``"0B3"``; a backward that leaves its weight
    gradients to a W is torch's input-gradient backward, ``"0I3"``, and the W its ``"0W3"``)."""
    out = {}
    for s, actions in enumerate(plan.stage_actions):
        deferred = deferred_chunks(actions)
        out[s] = [f"{s}{'I' if a.kind == 'B' and a.chunk_id in deferred else a.kind}{a.chunk_id}" for a in actions]
    return out


def pipelining_csv(plan: Plan) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    for _, row in sorted(pipelining_actions(plan).items()):
        writer.writerow(row)
    return buf.getvalue()


def write_pipelining_csv(plan: Plan, path: str | Path) -> None:
    Path(path).write_text(pipelining_csv(plan), newline="")


def pipeline_order_table(plan: Plan) -> str:
    """The Plan as torch's step x rank grid (its own formatter; a step is an action slot)."""
    from torch.distributed.pipelining.schedules import _Action, _format_pipeline_order

    order = {r: [_Action.from_str(a) for a in row] for r, row in pipelining_actions(plan).items()}
    return _format_pipeline_order(order)
