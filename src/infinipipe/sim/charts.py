"""Gantt chart and memory timeline of a simulated plan (matplotlib, Agg back-end, PNG).

One row per stage; forward boxes blue and backward boxes orange (told apart at a glance however
many chunks there are, each box outlined), the recompute part of a backward purple, idle time in
pale tints of what the stage waited for (`sim/idle.py`), and a legend naming each; with a host
tier, two thin lanes under each stage's actions show its copies to the host and back. Below, each
stage's memory over time with the device budget.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ..contract.ir import Plan  # noqa: E402
from ..contract.units import GIB  # noqa: E402
from .simulator import SimResult  # noqa: E402

COLOURS = {"F": "#4c72b0", "B": "#dd8452", "W": "#937860", "recompute": "#8172b3", "d2h": "#55a868", "h2d": "#c44e52"}
IDLE_COLOURS = {"fill": "#e6e6e6", "forward_wait": "#c6dbef", "chain": "#fdd0a2", "memory": "#f2c4de",
                "drain": "#bdbdbd", "collectives": "#c7e9c0"}
IDLE_LABELS = {"fill": "idle: fill", "forward_wait": "idle: forward wait", "chain": "idle: backward chain",
               "memory": "idle: memory (order, host copies)", "drain": "idle: drain",
               "collectives": "FSDP gather / reduce-scatter"}


def draw_chart(plan: Plan, result: SimResult, path: str | Path) -> Path:
    """Write the Gantt chart and memory timeline of ``result`` (a simulation of ``plan``) to ``path``."""
    stages = plan.num_stages
    fig, (gantt, memory) = plt.subplots(
        2, 1, figsize=(14, 2.0 + 0.55 * stages + 3.0), height_ratios=[0.55 * stages + 1, 3], sharex=True
    )
    end = result.iteration_time_s
    height = 0.6 if result.copies else 0.8  # room for the copy lanes below the actions
    spans = result.idle_spans()
    for span in spans:
        gantt.broken_barh([(span.start_s, span.end_s - span.start_s)], (span.stage - 0.4, height),
                          facecolors=IDLE_COLOURS[span.category], edgecolor="none")
    for iv in result.intervals:
        gantt.broken_barh([(iv.start_s, iv.end_s - iv.start_s)], (iv.stage - 0.4, height),
                          facecolors=COLOURS[iv.kind], edgecolor="white", linewidth=0.4)
        if iv.recompute_s > 0:
            gantt.broken_barh([(iv.start_s, iv.recompute_s)], (iv.stage - 0.4, height),
                              facecolors=COLOURS["recompute"], edgecolor="white", linewidth=0.4)
    for stage, direction, start, stop in result.copies:
        gantt.broken_barh([(start, stop - start)], (stage + (0.22 if direction == "d2h" else 0.31), 0.08),
                          facecolors=COLOURS[direction], edgecolor="none")
    gantt.set_yticks(range(stages), [f"stage {s}" for s in range(stages)])
    gantt.invert_yaxis()
    gantt.set_title(
        f"{result.planner or 'plan'}: {result.num_chunks} chunks, {result.num_pipelines} pipeline(s), "
        f"iteration {end:.3f}s, bubbles {result.bubble_ratio:.1%} (simulated)"
    )
    gantt.legend(handles=[
        Patch(facecolor=COLOURS["F"], label="forward"),
        Patch(facecolor=COLOURS["B"], label="backward"),
        *([Patch(facecolor=COLOURS["W"], label="weight gradients (deferred)")]
          if any(iv.kind == "W" for iv in result.intervals) else []),
        Patch(facecolor=COLOURS["recompute"], label="recompute (start of a backward)"),
        *(Patch(facecolor=IDLE_COLOURS[c], label=IDLE_LABELS[c]) for c in IDLE_COLOURS
          if any(span.category == c for span in spans)),
        *([Patch(facecolor=COLOURS["d2h"], label="copy to host"), Patch(facecolor=COLOURS["h2d"], label="copy back")]
          if result.copies else []),
    ], loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    for s, timeline in enumerate(result.memory_timeline):
        times = [t for t, _ in timeline] + [end]
        levels = [v / GIB for _, v in timeline] + [timeline[-1][1] / GIB]
        memory.step(times, levels, where="post", label=f"stage {s}")
    if result.memory_budget is not None:
        memory.axhline(result.memory_budget / GIB, color="red", linestyle="--", label="budget")
    memory.set_xlabel("time (s)")
    memory.set_ylabel("memory (GiB)")
    memory.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncol=1 + stages // 12)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
