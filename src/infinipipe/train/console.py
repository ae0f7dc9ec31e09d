"""What a training job prints while it runs: a start-up banner and one line per logged step.

A cluster's log file is read long after the run, so the banner states everything a run depends
on (model, data, mesh, planner, run directory), and without a terminal each logged step is one
line in the shape torchtitan users know (``step: 5  loss: 7.1234  tps: 3,512 ...``). The bubble
figure is the one the metrics record: idle time over pipeline time summed over every stage.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..config import Config
from ..contract.cost import default_profile_name
from ..contract.model_config import ModelConfig
from ..data.dataset import TokenDataset
from ..runtime.parallel_dims import ParallelDims


def measured_bubble(results: Iterable[dict]) -> float:
    """Idle share of the pipelines' time, summed over stages (``busy_s``, ``pipeline_s`` per rank)."""
    results = list(results)
    busy = sum(r["busy_s"] for r in results)
    span = sum(r["pipeline_s"] for r in results)
    return 1.0 - busy / span if span > 0 else 0.0


def _parameters(model: ModelConfig) -> str:
    n = model.embedding_params() + model.layers * model.layer_params() + model.head_params()
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def banner(cfg: Config, run_dir: Path, dataset: TokenDataset, device: str, world: int,
           layers_per_stage: tuple[int, ...]) -> list[str]:
    """The lines printed once before training starts."""
    model = cfg.model_config()
    dims = ParallelDims.from_config(cfg.parallelism, world)
    name = f"Hugging Face model {cfg.model.hf_path}" if cfg.model.hf_path else f"'{cfg.model.flavor}'"
    vocab = f" mapped onto {cfg.data.vocab_size:,} ids" if cfg.data.vocab_size else ""
    source = cfg.data.path or "this Python's standard library"
    budget = (f"{cfg.training.global_batch_tokens:,} tokens" if cfg.training.global_batch_tokens
              else f"{cfg.training.global_batch_size:,} sequences")
    ckpt = cfg.checkpoint
    profile = cfg.epp.profile or default_profile_name(cfg.model.flavor)
    saving = (f"checkpoint every {ckpt.interval} steps into {ckpt.folder}/, keeping {ckpt.keep_latest_k or 'all'}"
              if ckpt.enable else "no checkpoints (checkpoint.enable = false)")
    return [
        f"infinipipe: training {name} ({model.layers} layers, {_parameters(model)} parameters) "
        f"for {cfg.training.steps} steps",
        f"data: {len(dataset):,} documents from {source} ({cfg.data.source}), tokenizer {cfg.data.tokenizer}{vocab}; "
        f"{budget} per step, sequences up to {cfg.training.seq_len:,} tokens",
        f"mesh: {world} process(es) on {device}: pp={dims.pp} (layers per stage {list(layers_per_stage)}), "
        f"dp={dims.dp}",
        f"planner: {cfg.epp.planner}, {cfg.epp.memory_budget} per device, profile {profile}"
        f"{', planning step i+1 while step i trains' if cfg.epp.prefetch else ''}",
        f"run directory: {run_dir} (config.toml, metrics.jsonl; {saving})",
    ]


def step_line(record: dict) -> str:
    """``step: 5  loss: 7.1234  tps: 3,512  bubble: 12.3% (predicted 10.1%)  plan: 0.12s ...``."""
    return (f"step: {record['step']}  loss: {record['loss']:.4f}  tps: {record['tokens_per_s']:,.0f}  "
            f"bubble: {record['bubble_ratio_measured']:.1%} (predicted {record['bubble_ratio_predicted']:.1%})  "
            f"time: {record['step_time_s']:.2f}s  plan: {record['planning_s']:.2f}s"
            f"{'' if record.get('planning_hidden', True) else ' (waited ' + format(record['plan_wait_s'], '.2f') + 's)'}  "
            f"lr: {record['lr']:.2e}  grad_norm: {record['grad_norm']:.3f}")


def resume_line(start: int, steps: int, checkpoint: Path) -> str:
    """What a resumed run says first, and why it may have nothing left to do."""
    line = f"resuming from step {start} (checkpoint {checkpoint})"
    if start >= steps:
        line += (f"; training.steps = {steps} is already reached, so nothing is left to train "
                 "(raise --steps to go on, or give another --run-dir to start afresh)")
    return line


def say(line: str) -> None:
    """One line on stdout, flushed at once so a log file keeps up with the run."""
    print(line, flush=True)
