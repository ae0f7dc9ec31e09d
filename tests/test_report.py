"""Metrics are written one JSON line per step and drawn into a PNG report."""
from __future__ import annotations

from infinipipe.cli import main
from infinipipe.train.metrics import MetricsWriter, read_metrics


def test_metrics_jsonl_roundtrip_and_resume_truncates_redone_steps(tmp_path):
    w = MetricsWriter(tmp_path)
    for step in range(1, 6):
        w.write({"step": step, "loss": 5.0 - step * 0.1, "tokens": 1000, "step_time_s": 0.5})
    w.close()
    MetricsWriter(tmp_path, resume_step=3).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_report_command_draws_a_png(tmp_path, capsys):
    w = MetricsWriter(tmp_path)
    for step in range(1, 4):
        w.write({"step": step, "loss": 3.0 / step, "tokens": 500, "step_time_s": 0.25})
    assert main(["report", str(tmp_path)]) == 0
    out = tmp_path / "report.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in capsys.readouterr().out


def test_report_of_a_directory_without_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
