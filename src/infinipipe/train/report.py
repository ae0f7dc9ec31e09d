"""A run's chart, drawn from its metrics.jsonl: loss, and throughput and bubble ratio as measured
beside the simulator's prediction for the same plans (the headline of a planner: how much of the
pipeline sits idle, and whether the cost model saw it coming). The title names the run from its
config.toml: model, planner, pipeline degree.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..config import load_config  # noqa: E402
from .metrics import read_metrics  # noqa: E402


def report_title(run_dir: Path) -> str:
    """The run as its config.toml describes it (the folder's name when it has none)."""
    config = run_dir / "config.toml"
    if not config.is_file():
        return f"run {run_dir.name}"
    cfg = load_config(config)
    model = f"Hugging Face {Path(cfg.model.hf_path).name}" if cfg.model.hf_path else f"'{cfg.model.flavor}'"
    return (f"{model} ({cfg.model_config().layers} layers), planner {cfg.epp.planner}, "
            f"pp={cfg.parallelism.pipeline_parallel_degree}, {cfg.epp.memory_budget} per device — {run_dir.name}")


def draw_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no steps")
    steps = [r["step"] for r in records]
    predicted = all("iteration_time_predicted_s" in r and "bubble_ratio_measured" in r for r in records)
    fig, axes = plt.subplots(3 if predicted else 2, 1, figsize=(9, 8.5 if predicted else 6), sharex=True)
    ax_loss, ax_tps = axes[0], axes[1]
    ax_loss.plot(steps, [r["loss"] for r in records], marker=".")
    ax_loss.set_ylabel("loss (per predicted token)")
    ax_tps.plot(steps, [r["tokens"] / r["step_time_s"] for r in records], marker=".", color="tab:green",
                label="measured")
    ax_tps.set_ylabel("tokens / s")
    if predicted:
        ax_tps.plot(steps, [r["tokens"] / r["iteration_time_predicted_s"] for r in records], linestyle="--",
                    color="tab:green", alpha=0.6, label="predicted by the simulator")
        ax_bubble = axes[2]
        ax_bubble.plot(steps, [100 * r["bubble_ratio_measured"] for r in records], marker=".", color="tab:red",
                       label="measured")
        ax_bubble.plot(steps, [100 * r["bubble_ratio_predicted"] for r in records], linestyle="--",
                       color="tab:red", alpha=0.6, label="predicted by the simulator")
        ax_bubble.set_ylabel("bubble ratio (%)")
        ax_bubble.set_ylim(bottom=0)
        ax_bubble.legend(fontsize=8)
        ax_tps.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(report_title(run_dir), fontsize=11)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "report.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
