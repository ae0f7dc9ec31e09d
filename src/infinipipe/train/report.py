"""Loss curve and throughput of a run, drawn from its metrics.jsonl."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .metrics import read_metrics  # noqa: E402


def draw_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no steps")
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_tps) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in records], marker=".")
    ax_loss.set_ylabel("loss (per predicted token)")
    ax_loss.grid(alpha=0.3)
    ax_tps.plot(steps, [r["tokens"] / r["step_time_s"] for r in records], marker=".", color="tab:green")
    ax_tps.set_ylabel("tokens / s (measured)")
    ax_tps.set_xlabel("step")
    ax_tps.grid(alpha=0.3)
    fig.suptitle(f"run {Path(run_dir).name}")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "report.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
