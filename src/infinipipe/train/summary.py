"""The lines a person reads when a run ends."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import Config
from ..runtime.parallel_dims import ParallelDims
from .loop import TrainResult
from .metrics import read_metrics


def print_summary(cfg: Config, result: TrainResult) -> None:
    ran = len(result.losses)
    p = cfg.parallelism
    world = ParallelDims.from_config(p).world_size
    if not ran:
        if not result.stop_signal:  # a stop before the first step has said where it stopped
            print(f"\nnothing trained: the run was already at step {result.start_step} of {cfg.training.steps}")
        return
    records = read_metrics(result.run_dir)
    print(f"\ntrained {ran} step(s) (steps {result.start_step + 1}..{result.start_step + ran} of {cfg.training.steps}) "
          f"of {cfg.model_config().layers}-layer '{cfg.model.flavor}' on {world} process(es): "
          f"pp={p.pipeline_parallel_degree}, planner {cfg.epp.planner}")
    if ran:
        print(f"loss (measured): {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
        print(f"throughput (measured): {result.tokens:,} tokens in {result.wall_s:.1f} s = "
              f"{result.tokens_per_s:,.0f} tokens/s")
    mine = [r for r in records if r["step"] > result.start_step]
    if mine:
        cpu_ranks = None if torch.cuda.is_available() else int(os.environ.get("LOCAL_WORLD_SIZE", world))
        print(bubble_line(cfg, mine, cpu_ranks, os.cpu_count() or 1))
    print(data_line(cfg, dict(result.documents)))
    print(f"metrics: {Path(result.run_dir) / 'metrics.jsonl'}  (draw them: infinipipe report {result.run_dir})")


def bubble_line(cfg: Config, rows: list[dict], cpu_ranks: int | None, cores: int) -> str:
    """Measured and predicted bubble ratio and the planning figures, over ``rows``. Where
    ``cpu_ranks`` CPU processes and the planning process outnumber the machine's ``cores``, a stage
    also waits for a core, which the simulator (a device per stage) does not count: the line says
    so, or a newcomer reads the gap as the simulator's error."""
    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    line = (f"bubble ratio: measured {mean('bubble_ratio_measured'):.1%}, "
            f"predicted by the simulator {mean('bubble_ratio_predicted'):.1%}; "
            f"planning {mean('planning_s'):.2f} s/step (overlapped: {cfg.epp.prefetch}; hidden behind the "
            f"step before in {sum(bool(r.get('planning_hidden')) for r in rows)} of {len(rows)} steps, "
            f"{sum(r.get('planning_skipped', 0) for r in rows)} candidates skipped for the deadline)")
    if cpu_ranks is not None and cpu_ranks + 1 > cores:
        line += (f"\n  (measured exceeds predicted here: {cpu_ranks} ranks and the planning process share "
                 f"{cores} cores, so a stage also waits for a core, which the simulator, one device per stage, "
                 f"does not count)")
    return line


def data_line(cfg: Config, documents: dict[str, int]) -> str:
    """What the length policy did to the corpus, and the setting that chose it."""
    seq_len, policy = cfg.training.seq_len, cfg.data.over_long
    over = documents["truncated"] if policy == "truncate" else documents["rejected"]
    action = "truncated to it" if policy == "truncate" else "dropped"
    other = "'reject' drops them" if policy == "truncate" else "'truncate' keeps their first tokens"
    line = (f"data: {documents['kept']:,} documents; {over:,} longer than training.seq_len = {seq_len:,} {action} "
            f"(data.over_long = '{policy}'; {other})")
    if documents["too_short"]:
        line += f"; {documents['too_short']:,} shorter than data.min_doc_tokens = {cfg.data.min_doc_tokens} dropped"
    return line
