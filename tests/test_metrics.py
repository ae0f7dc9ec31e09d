"""metrics.jsonl never loses a row without a word, and a crash's torn line does not block a resume."""
from __future__ import annotations

import json

import pytest

from infinipipe.train.metrics import MetricsWriter, read_metrics


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(tmp_path, steps, resume_step=0, run="run-a"):
    w = MetricsWriter(tmp_path, resume_step=resume_step, run=run)
    for step in steps:
        w.write({"step": step, "loss": 10.0 - step})
    w.close()


def test_resume_keeps_rows_up_to_its_step_and_the_redone_ones_in_a_file_aside(tmp_path, capsys):
    _run(tmp_path, range(1, 7))
    _run(tmp_path, range(4, 9), resume_step=3)
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 9))
    (aside,) = tmp_path.glob("metrics-*.jsonl")
    assert [r["step"] for r in _rows(aside)] == list(range(1, 7))
    assert f"resuming from step 3 redoes steps logged in {tmp_path / 'metrics.jsonl'}" in capsys.readouterr().err


def test_fresh_run_in_a_used_directory_moves_the_old_rows_aside(tmp_path, capsys):
    _run(tmp_path, range(1, 51))
    _run(tmp_path, [1])
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    (aside,) = tmp_path.glob("metrics-*.jsonl")
    assert len(_rows(aside)) == 50
    assert f"its 50 rows are kept in {aside}" in capsys.readouterr().err


def test_resume_at_the_last_logged_step_leaves_the_file_alone(tmp_path):
    _run(tmp_path, range(1, 4))
    _run(tmp_path, range(4, 6), resume_step=3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    assert not list(tmp_path.glob("metrics-*.jsonl"))


def test_torn_last_line_is_dropped_with_a_warning_naming_file_and_line(tmp_path, capsys):
    _run(tmp_path, range(1, 4))
    path = tmp_path / "metrics.jsonl"
    with path.open("a") as f:
        f.write('{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert f"{path}: line 4 is torn" in capsys.readouterr().err
    _run(tmp_path, [4], resume_step=3)
    assert [r["step"] for r in _rows(path)] == [1, 2, 3, 4]


def test_bad_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{path}: line 2 is not a metrics row"):
        MetricsWriter(tmp_path, resume_step=3)
    assert path.read_text() == '{"step": 1}\nnot json\n{"step": 3}\n'


def test_resume_keeps_no_rows_of_another_run_and_takes_its_own_back_from_where_they_went(tmp_path, capsys):
    _run(tmp_path, range(1, 17), run="checkpointed")
    _run(tmp_path, range(1, 4), run="without-checkpoints")  # a rerun with checkpoint.enable = false
    capsys.readouterr()
    _run(tmp_path, range(17, 21), resume_step=16, run="checkpointed")
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["run"]) for r in rows] == [(s, "checkpointed") for s in range(1, 21)]
    err = capsys.readouterr().err
    assert "holds 3 rows of another run" in err
    moved = [p for p in tmp_path.glob("metrics-*.jsonl") if [r["step"] for r in _rows(p)] == [1, 2, 3]]
    assert len(moved) == 1 and str(moved[0]) in err
    assert "took this run's 16 earlier rows back" in err


def test_resume_right_after_another_runs_rerun_finds_its_rows_for_the_report(tmp_path, capsys):
    """A finished run, a rerun with checkpoints off, then the original command again (which
    resumes at the last step and trains nothing): metrics.jsonl is the original run's again."""
    _run(tmp_path, range(1, 13), run="original")
    _run(tmp_path, range(1, 3), run="checkpoints-off")
    _run(tmp_path, [], resume_step=12, run="original")
    assert [(r["step"], r["run"]) for r in read_metrics(tmp_path)] == [(s, "original") for s in range(1, 13)]
    assert sorted(len(_rows(p)) for p in tmp_path.glob("metrics-*.jsonl")) == [2, 12]
