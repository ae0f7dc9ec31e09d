"""The pipelined training job reproduces a plain single-device run, and resumes exactly."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infinipipe.config import load_config
from infinipipe.data.dataset import build_dataset
from infinipipe.model.hf import load_hf_checkpoint
from infinipipe.runtime.local import build_stages
from infinipipe.train.checkpoint import export_hf
from infinipipe.train.loop import run_training
from infinipipe.train.single_device import reference_losses

pytestmark = pytest.mark.slow

SMALL_RUN = ["--data.max_docs=120", "--training.seq_len=2048", "--training.global_batch_tokens=4096",
             "--lr_scheduler.warmup_steps=3", "--epp.memory_budget=96MiB"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture(scope="module")
def four_step_reference(cache_dir) -> list[float]:
    """The single-device losses of the 4-step runs below: a single-device run reads no
    parallelism setting, so the runs that differ only in their mesh share it."""
    cfg = load_config(None, SMALL_RUN + [f"--data.cache_dir={cache_dir}", "--training.steps=4"])
    return reference_losses(cfg, build_dataset(cfg)[0])


def _losses_in(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def _losses(run_dir: Path) -> list[float]:
    return _losses_in(run_dir / "metrics.jsonl")


def test_exact_epp_pp4_training_matches_single_device_losses_for_12_steps(tmp_path, cache_dir):
    cfg = load_config(None, SMALL_RUN + [f"--data.cache_dir={cache_dir}", "--training.steps=12",
                                         "--parallelism.pipeline_parallel_degree=4", "--epp.planner=epp",
                                         "--epp.min_slices=2"])
    result = run_training(cfg, tmp_path, progress=False)
    dataset, _ = build_dataset(cfg)
    expected = reference_losses(cfg, dataset)
    assert len(result.losses) == 12
    assert result.losses[-1] < result.losses[0]
    for step, (got, want) in enumerate(zip(result.losses, expected), start=1):
        assert got == pytest.approx(want, rel=2e-4), f"step {step}"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    long = [p for r in records for p in r["plan"] if p["max_len"] >= 2048]
    assert long and all(p["split_sequences"] >= 1 for p in long), "a step did not split its longest sequence"


def test_planning_cut_by_its_deadline_hides_behind_the_step_and_trains_exactly(tmp_path, cache_dir,
                                                                               four_step_reference):
    """A deadline of 1% of the step cuts every search short (its unbounded search takes longer):
    from step 2 on the plan waits for no one, training never waits longer than the deadline, and
    the losses are the single device's."""
    cfg = load_config(None, SMALL_RUN + [f"--data.cache_dir={cache_dir}", "--training.steps=4",
                                         "--parallelism.pipeline_parallel_degree=2", "--epp.deadline_share=0.01"])
    result = run_training(cfg, tmp_path, progress=False)
    for step, (got, want) in enumerate(zip(result.losses, four_step_reference), start=1):
        assert got == pytest.approx(want, rel=2e-4), f"step {step}"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["planning_skipped"] > 0 for r in records)
    assert all(r["planning_hidden"] for r in records[1:])
    # Step k's plan is asked for when step k - 1's is handed out, so its deadline is 1% of the
    # training time of step k - 2 (steps 1 and 2: of the best plan's simulated time).
    for before, r in zip(records, records[2:]):
        assert r["planning_deadline_s"] == pytest.approx(0.01 * (before["step_time_s"] - before["plan_wait_s"]))
        assert r["plan_wait_s"] <= r["planning_deadline_s"]


def test_sp2_pp2_training_matches_single_device_losses(tmp_path, cache_dir, four_step_reference):
    cfg = load_config(None, SMALL_RUN + [f"--data.cache_dir={cache_dir}", "--training.steps=4",
                                         "--parallelism.pipeline_parallel_degree=2",
                                         "--parallelism.sequence_parallel_degree=2", "--epp.min_slices=2"])
    result = run_training(cfg, tmp_path, progress=False)
    expected = four_step_reference
    assert len(result.losses) == 4
    for step, (got, want) in enumerate(zip(result.losses, expected), start=1):
        assert got == pytest.approx(want, rel=2e-4), f"step {step}"


def test_fsdp_dp_shard2_pp2_training_matches_single_device_losses_and_resumes_from_a_sharded_checkpoint(
        tmp_path, cache_dir, four_step_reference):
    common = SMALL_RUN + [f"--data.cache_dir={cache_dir}", "--training.steps=4",
                          "--parallelism.pipeline_parallel_degree=2", "--parallelism.data_parallel_shard_degree=2",
                          "--epp.min_slices=2", "--checkpoint.enable=true", "--checkpoint.interval=2"]
    cfg = load_config(None, common)
    straight = run_training(cfg, tmp_path, progress=False).losses
    expected = four_step_reference
    assert len(straight) == 4
    for step, (got, want) in enumerate(zip(straight, expected), start=1):
        assert got == pytest.approx(want, rel=2e-4), f"step {step}"
    assert len(list((tmp_path / "checkpoint" / "step-2").glob("*.distcp"))) == 4  # every rank wrote its shards
    model_cfg = cfg.model_config()
    _, exported = load_hf_checkpoint(export_hf(tmp_path / "checkpoint" / "step-4", model_cfg, tmp_path / "hf"))
    (whole,) = build_stages(model_cfg, [model_cfg.layers])
    assert {n: t.shape for n, t in exported.items()} == {n: t.shape for n, t in whole.state_dict().items()}

    resumed = run_training(load_config(None, common + ["--checkpoint.load_step=2"]), tmp_path, progress=False)
    assert resumed.start_step == 2
    assert resumed.losses == pytest.approx(straight[2:], rel=1e-6)


def _six_steps(cache_dir: str) -> list[str]:
    return SMALL_RUN + [f"--data.cache_dir={cache_dir}", "--training.steps=6", "--parallelism.pipeline_parallel_degree=2",
                        "--checkpoint.enable=true", "--checkpoint.interval=3", "--training.deterministic=true"]


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, cache_dir) -> tuple[list[float], Path]:
    """An uninterrupted, deterministic 6-step pp=2 run with checkpoints after steps 3 and 6: its
    losses and run directory (copy it before changing anything there)."""
    run_dir = tmp_path_factory.mktemp("six-steps")
    return run_training(load_config(None, _six_steps(cache_dir)), run_dir, progress=False).losses, run_dir


def _plans(run_dir: Path) -> list[list[int]]:
    return [[p["num_chunks"] for p in json.loads(line)["plan"]] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_deterministic_runs_give_the_same_plans_and_losses_bit_for_bit(tmp_path, cache_dir, six_steps):
    """The default plans within a share of the step, so plans (and losses) follow the machine's
    load; training.deterministic plans on the batch alone."""
    straight, first = six_steps
    again = run_training(load_config(None, _six_steps(cache_dir)), tmp_path, progress=False)
    assert list(again.losses) == list(straight)
    assert _plans(tmp_path) == _plans(first)


def test_run_killed_between_steps_resumes_with_the_uninterrupted_losses(tmp_path, cache_dir, six_steps):
    common = _six_steps(cache_dir)
    straight, _ = six_steps

    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "infinipipe.cli", "train", "--no-progress", "--run-dir", str(run_dir), *common]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoint" / "latest").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run_dir / "checkpoint" / "latest").read_text().strip() == "step-3"

    resumed = run_training(load_config(None, common), run_dir, progress=False)
    assert resumed.start_step == 3
    assert _losses(run_dir) == list(straight)  # bit for bit: the killed run's rows, then the resumed ones


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_with_the_uninterrupted_losses(tmp_path, cache_dir,
                                                                                              capfd, six_steps):
    cfg = load_config(None, _six_steps(cache_dir))
    straight, done = six_steps
    tmp_path = tmp_path / "run"
    shutil.copytree(done, tmp_path)
    shard = tmp_path / "checkpoint" / "step-6" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the middle of a weight: loads without complaint
    shard.write_bytes(bytes(data))
    capfd.readouterr()

    resumed = run_training(cfg, tmp_path, progress=False)
    err = capfd.readouterr().err
    assert f"{shard}: contents differ from the manifest's sha256" in err
    assert "falling back to an older checkpoint" in err
    assert resumed.start_step == 3
    assert list(resumed.losses) == list(straight[3:])
    assert _losses(tmp_path) == list(straight)  # rows 1-3 kept, 4-6 redone
    (aside,) = tmp_path.glob("metrics-*.jsonl")
    assert _losses_in(aside) == pytest.approx(straight)


def test_bf16_run_with_fp32_master_weights_tracks_the_fp32_losses_for_10_steps(tmp_path, cache_dir):
    """Against the single-device fp32 losses, which the fp32 pipeline matches to 2e-4 (the exactness
    tests above): a 100 times closer stand-in for an fp32 pipeline run."""
    from dataclasses import replace

    from infinipipe.contract.cost import default_profile

    bf16_profile = tmp_path / "cpu-bf16-tiny.json"
    replace(default_profile("tiny"), dtype="bfloat16").save(bf16_profile)
    common = SMALL_RUN + [f"--data.cache_dir={cache_dir}", "--training.steps=10",
                          "--parallelism.pipeline_parallel_degree=2"]
    fp32_cfg = load_config(None, common)
    fp32 = reference_losses(fp32_cfg, build_dataset(fp32_cfg)[0])
    bf16 = run_training(load_config(None, common + ["--training.mixed_precision=bf16",
                                                     f"--epp.profile={bf16_profile}"]),
                        tmp_path / "bf16", progress=False).losses
    assert len(bf16) == 10 and bf16[-1] < bf16[0]
    for step, (got, want) in enumerate(zip(bf16, fp32), start=1):
        assert got == pytest.approx(want, rel=2e-2), f"step {step}"
    assert bf16 != pytest.approx(fp32, rel=1e-5), "the bf16 run computed in fp32"
