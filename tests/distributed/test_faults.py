"""A failing, killed or mismatched rank ends the job quickly with a message that names the cause."""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import time

import pytest
import torch
import torch.distributed as dist

from chunking import sequential_plan
from infinipipe.contract.ir import Chunk, Segment
from infinipipe.contract.model_config import ModelConfig
from infinipipe.runtime.batch import Batch
from infinipipe.runtime.executor import PipelineWorker, RuntimeSettings
from infinipipe.runtime.launch import RankFailed, launch_local
from infinipipe.runtime.parallel_dims import ParallelDims

pytestmark = pytest.mark.slow

CFG = ModelConfig(vocab_size=97, hidden=32, layers=2, heads=4, kv_heads=2, ffn=64)
LENGTHS = [9, 4]
BATCH = Batch.of([list(range(9)), [5, 6, 7, 8]])
CHUNKS = [Chunk(0, (Segment(0, 0, 5),)), Chunk(1, (Segment(0, 5, 9), Segment(1, 0, 4)))]


def _worker(fault: str):
    pp = dist.get_world_size()
    mesh = ParallelDims(pp=pp, dp_replicate=1).build_mesh()
    rank = dist.get_rank()
    dtype = torch.float64 if fault == "dtype" and rank == 1 else torch.float32
    cfg, layers = dataclasses.replace(CFG, layers=pp), (1,) * pp
    worker = PipelineWorker(cfg, layers, mesh, RuntimeSettings(dtype=dtype))
    plan = sequential_plan(CHUNKS, LENGTHS, layers)
    if fault == "plan" and rank == 1:
        plan = sequential_plan(CHUNKS, LENGTHS, layers, recompute={0: 1})
    worker.run_step(plan, BATCH)
    if rank == 1 and fault == "raise":
        raise RuntimeError("injected failure on rank 1")
    if rank == 1 and fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 1 and fault == "hang":
        os.kill(os.getpid(), signal.SIGSTOP)
    if rank == 3 and fault == "hang":
        time.sleep(2.5)  # starts waiting later than rank 2, which times out and leaves under it
    worker.run_step(plan, BATCH)  # rank 0 now waits on a peer that is gone
    return rank


def _fail(fault: str, collective_timeout_s: float = 30, ranks: int = 2) -> tuple[RankFailed, float]:
    t0 = time.monotonic()
    with pytest.raises(RankFailed) as info:
        launch_local(_worker, ranks, (fault,), collective_timeout_s=collective_timeout_s, timeout_s=120)
    return info.value, time.monotonic() - t0


def test_raising_rank_stops_the_job_with_its_own_traceback_within_60s():
    err, elapsed = _fail("raise")
    assert err.rank == 1 and "injected failure on rank 1" in err.detail
    assert elapsed < 60


def test_killed_rank_stops_the_job_and_is_named_within_60s():
    err, elapsed = _fail("kill")
    assert err.rank == 1 and "SIGKILL" in str(err)
    assert elapsed < 60


def test_hung_rank_is_named_with_its_pid_not_the_neighbours_that_timed_out_or_lost_their_peer():
    """With 4 stages, rank 0 and rank 2 time out waiting for the stopped rank 1, and rank 3 loses
    rank 2 and fails with "Connection closed by peer" rather than a timeout: the stopped rank is
    still named."""
    err, elapsed = _fail("hang", collective_timeout_s=5, ranks=4)
    assert err.rank == 1 and "stopped responding" in err.detail, str(err)
    assert re.search(r"process \d+ is stopped", err.detail)
    assert "rank 0:" in str(err)  # the neighbour's timeout is still shown, as a consequence
    assert elapsed < 60


def test_stages_running_different_plans_are_rejected_before_any_transfer():
    err, _ = _fail("plan")
    assert "hold different plans" in err.detail


def test_dtype_mismatch_between_stages_names_stage_and_chunk():
    err, _ = _fail("dtype")
    assert err.rank == 1
    assert "stage 1, chunk 0: expected the act of chunk 0 from stage 0" in err.detail
    assert "float64" in err.detail and "float32" in err.detail
