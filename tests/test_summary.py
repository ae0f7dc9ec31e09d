"""The end-of-run lines say what the length policy did to the corpus and which setting chose it."""
from __future__ import annotations

from infinipipe.config import load_config
from infinipipe.train.summary import data_line


def test_truncated_documents_are_counted_with_the_policy_that_truncated_them():
    line = data_line(load_config(None, ["--training.seq_len=2048"]),
                     {"kept": 1200, "truncated": 12, "rejected": 0, "too_short": 3})
    assert "12 longer than training.seq_len = 2,048 truncated to it (data.over_long = 'truncate'" in line
    assert "3 shorter than data.min_doc_tokens = 2 dropped" in line


def test_rejected_documents_are_counted_under_the_reject_policy():
    line = data_line(load_config(None, ["--data.over_long=reject"]),
                     {"kept": 1188, "truncated": 0, "rejected": 12, "too_short": 0})
    assert "1,188 documents; 12 longer than training.seq_len = 8,192 dropped (data.over_long = 'reject'" in line
    assert "shorter" not in line


def test_a_stop_before_the_first_step_ends_is_no_error_and_not_called_a_finished_run(tmp_path, capsys):
    import signal

    from infinipipe.train.loop import TrainResult
    from infinipipe.train.summary import print_summary

    cfg = load_config(None, ["--training.steps=8"])
    for start in (0, 4):  # a fresh run directory (no metrics.jsonl yet), a resumed one
        print_summary(cfg, TrainResult(start, (), 0, 1.0, str(tmp_path), stop_signal=signal.SIGINT))
        assert "already at step" not in capsys.readouterr().out


ROWS = [{"bubble_ratio_measured": 0.249, "bubble_ratio_predicted": 0.175, "planning_s": 0.2, "planning_hidden": True,
         "planning_skipped": 3}]


def test_bubble_line_says_why_measured_exceeds_predicted_where_ranks_outnumber_the_cores():
    from infinipipe.train.summary import bubble_line

    cfg = load_config(None, [])
    line = bubble_line(cfg, ROWS, cpu_ranks=4, cores=2)
    assert line.startswith("bubble ratio: measured 24.9%, predicted by the simulator 17.5%")
    assert "4 ranks and the planning process share 2 cores" in line and "does not count" in line
    assert "\n" not in bubble_line(cfg, ROWS, cpu_ranks=4, cores=16)  # a core each: nothing to explain
    assert "\n" not in bubble_line(cfg, ROWS, cpu_ranks=None, cores=2)  # GPUs: the cores do not run stages
