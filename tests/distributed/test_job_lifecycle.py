"""A job as a cluster sees it: exit codes, signals, one job per run directory."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SMALL_RUN = ["--data.max_docs=120", "--training.seq_len=2048", "--training.global_batch_tokens=4096",
             "--lr_scheduler.warmup_steps=3", "--epp.memory_per_device=96MiB",
             "--parallelism.pipeline_parallel_degree=2"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("token-cache"))


def _train_args(run_dir, cache_dir, *extra: str) -> list[str]:
    return ["-m", "infinipipe.cli", "train", "--no-progress", "--run-dir", str(run_dir),
            f"--data.cache_dir={cache_dir}", *SMALL_RUN, *extra]


def test_torchrun_job_of_two_ranks_exits_0_and_prints_one_summary(tmp_path, cache_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *_train_args(tmp_path, cache_dir, "--training.steps=2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("trained 2 step(s)") == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
