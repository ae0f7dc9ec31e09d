"""`infinipipe train` refuses input it cannot train on before starting any rank."""
from __future__ import annotations

import json
import os
import re

import pytest

from infinipipe.cli import main


def test_corpus_smaller_than_one_global_batch_is_refused_before_any_rank_starts(tmp_path, capsys):
    args = ["train", "--no-progress", "--run-dir", str(tmp_path), f"--data.cache_dir={tmp_path / 'cache'}",
            "--data.max_docs=3", "--training.seq_len=2048", "--training.global_batch_tokens=1000000"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("infinipipe train: error: training.global_batch_tokens (1000000) exceeds the corpus's")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("token-cache")


def _refusal(tmp_path, capsys, cache_dir, *overrides: str) -> str:
    """Run `infinipipe train` expecting a refusal; return its one stderr line after checking no
    rank ran (a rank would have written metrics or a failure report)."""
    run_dir = tmp_path / "run"
    args = ["train", "--no-progress", "--run-dir", str(run_dir), f"--data.cache_dir={cache_dir}",
            "--data.max_docs=200", *overrides]
    kept, lock = run_dir / "config.toml", run_dir / "job.lock"
    if kept.exists():
        before = kept.read_text()
    existed = run_dir.exists()
    if existed:
        lock.write_text("pid 1 on host elsewhere (started earlier)\n")
        os.utime(lock, (1e9, 1e9))
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "failure.txt").exists()
    assert not kept.exists() or kept.read_text() == before, "a refused job rewrote the run's config.toml"
    assert run_dir.exists() == existed, "a refused job made its run directory"
    if existed:
        assert lock.stat().st_mtime == 1e9 and lock.read_text().startswith("pid 1 "), "a refused job touched job.lock"
    return lines[0]


def test_unknown_planner_is_refused_before_any_rank_starts(tmp_path, capsys, cache_dir):
    line = _refusal(tmp_path, capsys, cache_dir, "--epp.planner=foo")
    assert line.startswith("infinipipe train: error: epp.planner 'foo' is not a planner; known: batch-1f1b, epp")


def test_more_stages_than_layers_is_refused_before_any_rank_starts(tmp_path, capsys, cache_dir):
    line = _refusal(tmp_path, capsys, cache_dir, "--parallelism.pipeline_parallel_degree=8")
    assert "parallelism.pipeline_parallel_degree = 8 exceeds the model's 4 layers" in line


def test_memory_budget_below_the_model_is_refused_naming_the_bound_and_the_budget_that_plans(tmp_path, capsys, cache_dir):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text("# the config of the job that wrote this directory\n")
    line = _refusal(tmp_path, capsys, cache_dir, "--epp.memory_budget=1MiB")
    assert line.startswith("infinipipe train: error: epp.memory_budget = 1MiB is too small for this batch")
    assert "any plan needs at least" in line and "epp plans it from" in line
    assert re.search(r"--epp.memory_budget=\d+MiB$", line)


def test_bad_override_is_not_hidden_by_a_later_steps_flag(tmp_path, capsys, cache_dir):
    line = _refusal(tmp_path, capsys, cache_dir, "--training.steps=abc", "--steps", "2")
    assert line == "infinipipe train: error: training.steps must be int, got str 'abc'"


def test_load_step_missing_from_the_run_dir_is_refused_before_any_rank_starts(tmp_path, capsys, cache_dir):
    line = _refusal(tmp_path, capsys, cache_dir, "--checkpoint.load_step=7")
    assert line.startswith("infinipipe train: error: checkpoint.load_step = 7: no ")
    assert line.endswith("step-7 (checkpoints there: none)")


def test_run_dir_whose_every_checkpoint_is_damaged_is_refused_before_any_rank_starts(tmp_path, capsys, cache_dir):
    for step in (2, 4):
        ckpt = tmp_path / "run" / "checkpoint" / f"step-{step}"
        ckpt.mkdir(parents=True)
        files = {"__0_0.distcp": {"bytes": 9, "sha256": ""}}
        (ckpt / "manifest.json").write_text(json.dumps({"step": step, "files": files}))
        (ckpt / "__0_0.distcp").write_bytes(b"torn")
    line = _refusal(tmp_path, capsys, cache_dir)
    assert line.startswith(f"infinipipe train: error: no intact checkpoint in {tmp_path / 'run' / 'checkpoint'}")
    assert "step-4: " in line and "__0_0.distcp: 4 bytes, the manifest says 9" in line


def _unmakeable(tmp_path, case: str):
    if case == "an existing file":
        (tmp_path / "taken").write_text("not a directory")
        return tmp_path / "taken", "is a file, not a directory"
    if case == "a path under a file":
        (tmp_path / "file").write_text("not a directory")
        return tmp_path / "file" / "run", f"cannot be made: {tmp_path / 'file'} is a file, not a directory"
    if case == "a name too long":
        return tmp_path / ("r" * 300) / "run", "cannot be made: File name too long (a name of 300 bytes"
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder")
    (tmp_path / "locked").mkdir(mode=0o555)
    return tmp_path / "locked" / "run", f"cannot be made: no new folder can go into {tmp_path / 'locked'}"


@pytest.mark.parametrize("case", ["an existing file", "a path under a file", "a name too long", "a read-only parent"])
def test_run_dir_that_cannot_be_made_is_one_error_line_before_the_config_is_checked(tmp_path, capsys, case):
    run_dir, reason = _unmakeable(tmp_path, case)
    # the planner is bad too: the run directory is checked first, and in no time
    args = ["train", "--no-progress", "--run-dir", str(run_dir), "--epp.planner=foo"]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"infinipipe train: error: run directory {run_dir} "), lines
    assert reason in lines[0]
