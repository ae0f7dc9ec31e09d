"""``infinipipe train``: the training job (the embedded default needs no arguments)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model with elastic pipeline parallelism",
        description="Train with EPP. Any config key can be overridden: --training.steps=50 --epp.planner=seq1f1b",
    )
    p.add_argument("--config", help="TOML config file (default: the embedded default run)")
    p.add_argument("--steps", type=int, help="shorthand for --training.steps")
    p.add_argument("--run-dir", help="where metrics, the config and checkpoints go (default: job.dump_folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs and CI)")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args: argparse.Namespace) -> int:
    from ..config import collect_overrides, load_config
    from ..train.loop import run_training
    from ..train.summary import print_summary

    overrides = collect_overrides(args.overrides)
    if args.steps is not None:
        overrides.append(f"--training.steps={args.steps}")
    cfg = load_config(args.config, overrides)
    run_dir = args.run_dir or cfg.job.dump_folder
    result = run_training(cfg, run_dir, progress=not args.no_progress)
    if result is not None:  # rank 0 (or the local launcher) speaks for the job
        print_summary(cfg, result)
    return 0
