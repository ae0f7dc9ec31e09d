"""``infinipipe train``: the training job (the embedded default needs no arguments).

Exit status: 0 when every step ran, 128 + the signal number when a stop signal ended the job
early (after its checkpoint; 0 under torchrun, which reads any other status as a failure), 1 when
a rank failed, 2 for bad input (a checkpoint the ranks find damaged too: every rank sees the same,
so none is blamed). A failed job prints one line; the ranks' tracebacks go to
``RUN_DIR/failure.txt``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..runtime.signals import JobStopped, StopBeforeLaunch, signal_name


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model with elastic pipeline parallelism",
        description="Train with EPP. Any config key can be overridden: --training.steps=50 --epp.planner=seq1f1b. "
                    "The whole configuration is checked before any process starts. Checkpoints are written every "
                    "checkpoint.interval steps (on by default) into RUN_DIR/checkpoint; running the same command "
                    "again resumes from the newest intact one and says so (--checkpoint.load_step=N picks one, "
                    "--checkpoint.enable=false turns checkpointing off). With a terminal a progress bar shows the "
                    "run; without one (a log file) every metrics.log_freq-th step is one line.",
    )
    p.add_argument("--config", help="TOML config file (default: the embedded default run)")
    p.add_argument("--steps", type=int, help="shorthand for --training.steps")
    p.add_argument("--run-dir", help="where metrics, the config and checkpoints go (default: job.dump_folder)")
    p.add_argument("--no-progress", action="store_true",
                   help="one line per logged step instead of a progress bar (the default without a terminal)")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args: argparse.Namespace) -> int:
    from ..train.loop import run_training  # noqa: F401  (torch, whose import a stop must not break)

    # Once torch is imported, a stop while the job is checked and its ranks start ends it in one
    # line; the launcher's and the ranks' own handling take over while they run.
    try:
        with StopBeforeLaunch() as stop:
            return _train(args, stop)
    except JobStopped as exc:
        return _stopped(exc)


def _train(args: argparse.Namespace, stop: StopBeforeLaunch) -> int:
    from ..config import collect_overrides, load_config
    from ..runtime.launch import RankFailed, under_torchrun
    from ..train.checkpoint import CheckpointError, CheckpointWriteError
    from ..train.loop import FAILURE, run_training
    from ..train.summary import print_summary

    overrides = collect_overrides(args.overrides)
    if args.steps is not None:
        overrides.append(f"--training.steps={args.steps}")
    cfg = load_config(args.config, overrides)
    run_dir = Path(args.run_dir or cfg.job.dump_folder)
    try:
        result = run_training(cfg, run_dir, progress=not args.no_progress and sys.stdout.isatty())
    except RankFailed as exc:
        report = run_dir / FAILURE
        report.write_text(f"{exc}\n")
        # errors about the job's checkpoint name their own ranks; the rank that reported first is no cause
        for error, code in ((CheckpointError, 2), (CheckpointWriteError, 1)):
            prefix = f"{error.__module__}.{error.__name__}: "
            if exc.last_line.startswith(prefix):
                return _fail(f"{exc.last_line.removeprefix(prefix)} (tracebacks: {report})", code)
        return _fail(f"{exc.headline} (tracebacks: {report})", 1)
    except TimeoutError as exc:
        return _fail(str(exc), 1)
    stop.restore()  # trained: a stop from here on is no start-up's
    if result is None:  # a rank other than 0 under torchrun: rank 0 speaks for the job
        return 0
    print_summary(cfg, result)
    # torchrun reports any other status of a rank as the job's failure, with its own traceback;
    # its rank 0 has said where the job stopped and how to resume
    return 128 + result.stop_signal if result.stop_signal and not under_torchrun() else 0


def _stopped(exc: JobStopped) -> int:
    """The status of a job a stop ended early, and its one line unless rank 0 has printed it."""
    from ..runtime.launch import under_torchrun

    if exc.startup and os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 speaks for the job
        print(f"stopped by {signal_name(exc.signum)} during start-up; nothing was trained", file=sys.stderr)
    if exc.startup and under_torchrun():
        return 0  # torchrun reads any other status as a failure and prints its own traceback
    return 128 + exc.signum if exc.said or exc.startup else _fail(str(exc), 128 + exc.signum)


def _fail(message: str, code: int) -> int:
    print(f"infinipipe train: error: {message}", file=sys.stderr)
    return code
