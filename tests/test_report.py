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


def test_report_is_titled_from_the_runs_config_and_draws_predicted_beside_measured(tmp_path, capsys):
    from infinipipe.config import load_config
    from infinipipe.train.report import report_title

    (tmp_path / "config.toml").write_text(load_config(None, ["--epp.planner=seq1f1b"]).to_toml())
    w = MetricsWriter(tmp_path)
    for step in range(1, 4):
        w.write({"step": step, "loss": 3.0 / step, "tokens": 500, "step_time_s": 0.25, "bubble_ratio_measured": 0.2,
                 "bubble_ratio_predicted": 0.25, "iteration_time_predicted_s": 0.2})
    assert report_title(tmp_path).startswith("'tiny' (4 layers), planner seq1f1b, pp=4, 4GiB per device")
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
