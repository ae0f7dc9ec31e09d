"""What a training job prints: a banner naming what the run depends on, one line per logged step."""
from __future__ import annotations

from pathlib import Path

from infinipipe.config import load_config
from infinipipe.train.console import measured_bubble, resume_line, step_line

RECORD = {"step": 5, "loss": 7.12341, "tokens_per_s": 3512.4, "bubble_ratio_measured": 0.1234,
          "bubble_ratio_predicted": 0.101, "step_time_s": 4.66, "planning_s": 0.123, "lr": 3e-3, "grad_norm": 1.25}


def test_logged_step_is_one_line_of_torchtitan_style_key_value_pairs():
    line = step_line(RECORD)
    assert "\n" not in line
    assert line.startswith("step: 5  loss: 7.1234  tps: 3,512  bubble: 12.3% (predicted 10.1%)  ")
    assert "plan: 0.12s  lr" in line and "grad_norm: 1.250" in line
    waited = step_line({**RECORD, "planning_hidden": False, "plan_wait_s": 0.0456})
    assert "plan: 0.12s (waited 0.05s)  lr" in waited


def test_bubble_is_idle_time_over_pipeline_time_summed_over_stages_not_stage_0s():
    stages = [{"busy_s": 9.0, "pipeline_s": 10.0}, {"busy_s": 5.0, "pipeline_s": 10.0}]
    assert measured_bubble(stages) == 1 - 14 / 20
    assert measured_bubble(stages) != 1 - stages[0]["busy_s"] / stages[0]["pipeline_s"]


def test_resumed_run_names_its_step_and_checkpoint_and_says_when_nothing_is_left():
    ckpt = Path("out/checkpoint/step-10")
    assert resume_line(10, 30, ckpt) == f"resuming from step 10 (checkpoint {ckpt})"
    assert "nothing is left to train (raise --steps" in resume_line(30, 30, ckpt)


def test_checkpointing_is_on_by_default():
    cfg = load_config(None)
    assert cfg.checkpoint.enable and cfg.checkpoint.interval <= cfg.training.steps
