"""The gloo emulation of NCCL's semantics catches the schedules that hang on a GPU.

A device-wide synchronize waits for every posted receive, a batched P2P group completes as a
whole, and a process's groups run in the order they were posted; the emulation makes gloo wait
the same way, so a hang shows up as `NcclHang` within the process group's timeout instead of a CI
job that never ends. Every planner's plans run under the emulation in `test_exact_pipeline.py`;
these tests show that the emulation fails where NCCL hangs, and that the executor's posting order
(`p2p_order`) survives even a device-wide synchronize after every action.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from infinipipe.contract.ir import Chunk, Segment
from infinipipe.contract.model_config import ModelConfig
from infinipipe.planners.schedule import epp_schedule
from infinipipe.runtime.batch import Batch
from infinipipe.runtime.executor import PipelineWorker, RuntimeSettings
from infinipipe.runtime.launch import RankFailed, launch_local
from infinipipe.runtime.nccl_semantics import P2PGroup, device_synchronize
from infinipipe.runtime.parallel_dims import ParallelDims
from infinipipe.runtime.stage_compute import StageCompute

pytestmark = pytest.mark.slow

CFG = ModelConfig(vocab_size=97, hidden=32, layers=2, heads=4, kv_heads=2, ffn=64)
LENGTHS = [9, 6, 4, 5]
BATCH = Batch.of([[i % 97 for i in range(n)] for n in LENGTHS])
CHUNKS = [Chunk(0, (Segment(0, 0, 5),)), Chunk(1, (Segment(0, 5, 9), Segment(2, 0, 4))),
          Chunk(2, (Segment(1, 0, 6),)), Chunk(3, (Segment(3, 0, 5),))]
HANG_TIMEOUT_S = 4.0


def _one_f_one_b():
    return epp_schedule(CHUNKS, LENGTHS, 2, (1, 1), [[0, 1], [2, 3]])


def _with_device_sync_after_every_action() -> None:
    """A device-wide synchronize right after each action's compute (an executor timing its actions so)."""
    for name in ("forward", "backward"):
        run = getattr(StageCompute, name)

        def synced(self, *args, _run=run, **kwargs):
            out = _run(self, *args, **kwargs)
            device_synchronize(self.device)
            return out

        setattr(StageCompute, name, synced)


def _run_step(lookahead: int, device_sync: bool) -> float:
    if device_sync:
        _with_device_sync_after_every_action()
    worker = PipelineWorker(CFG, (1, 1), ParallelDims(pp=2).build_mesh(), RuntimeSettings(recv_lookahead=lookahead,
                                                                          nccl_semantics=True))
    return worker.run_step(_one_f_one_b(), BATCH).loss


def _completing_runs() -> dict[str, object]:
    """Worker: every run that must complete under the emulation, one process group for all (the
    device-synchronize patch last: it stays for the process's life)."""
    return {"batched group, op by op": _group_then_reply(False),
            "posting order, op by op": _receive_posted_before_the_send(False, "group"),
            "receive before a sync, op by op": _receive_posted_before_the_send(False, "sync"),
            "executor with recv lookahead": _run_step(1, False),
            "device sync with lookahead": _run_step(2, True)}


@pytest.fixture(scope="module")
def completed() -> list[dict[str, object]]:
    return launch_local(_completing_runs, 2, collective_timeout_s=HANG_TIMEOUT_S, timeout_s=90)


def test_executor_with_recv_lookahead_completes_under_nccl_semantics(completed):
    losses = [r["executor with recv lookahead"] for r in completed]
    assert losses[0] == losses[1] > 0


def test_executor_survives_a_device_sync_after_every_action_under_nccl_semantics(completed):
    """A stage posts no receive past its next send, so a device-wide synchronize after a compute
    waits only for transfers its neighbours can make without this stage."""
    losses = [r["device sync with lookahead"] for r in completed]
    assert losses[0] == losses[1] == completed[0]["executor with recv lookahead"]


def _receive_posted_before_the_send(emulate: bool, behind: str) -> bool:
    """Rank 0 posts the receive of y, then sends x; rank 1 sends y only after receiving x. Fine op
    by op; under NCCL x waits for y, ``behind`` a device synchronize (which waits for the posted
    receive) or in a second group (whose kernel starts only once the first group's ended)."""
    x, y = torch.zeros(3), torch.zeros(3)
    if dist.get_rank() == 0:
        first = P2PGroup([dist.P2POp(dist.irecv, y, 1)], ["recv y"], emulate)
        if behind == "sync":
            if emulate:
                device_synchronize(torch.device("cpu"))
            dist.send(x, 1)
        else:
            P2PGroup([dist.P2POp(dist.isend, x, 1)], ["send x"], emulate).wait(0)
        first.wait(0)
    else:
        dist.recv(x, 0)
        dist.send(y, 0)
    return True


def test_a_device_sync_waits_for_every_posted_receive_under_nccl_semantics(completed):
    assert all(r["receive before a sync, op by op"] for r in completed)
    with pytest.raises(RankFailed, match="NcclHang"):
        launch_local(_receive_posted_before_the_send, 2, (True, "sync"), collective_timeout_s=HANG_TIMEOUT_S,
                     timeout_s=60)


def test_groups_run_in_the_order_they_were_posted_under_nccl_semantics(completed):
    assert all(r["posting order, op by op"] for r in completed)
    with pytest.raises(RankFailed, match="NcclHang"):
        launch_local(_receive_posted_before_the_send, 2, (True, "group"), collective_timeout_s=HANG_TIMEOUT_S,
                     timeout_s=60)


def _group_then_reply(emulate: bool) -> bool:
    """Rank 0 posts [send x, recv y] as one group and waits for y only, then sends z; rank 1 sends
    y, needs z (another tag), and only then receives x. Fine op by op (a gloo send completes
    once its receive is posted); under NCCL rank 0's group waits for x."""
    x, y, z = (torch.zeros(3) for _ in range(3))
    if dist.get_rank() == 0:
        group = P2PGroup([dist.P2POp(dist.isend, x, 1), dist.P2POp(dist.irecv, y, 1)], ["send x", "recv y"], emulate)
        group.wait(1)
        dist.send(z, 1, tag=1)
        group.wait(0)
    else:
        sent = dist.isend(y, 0)
        dist.recv(z, 0, tag=1)
        dist.recv(x, 0)
        sent.wait()
    return True


def test_a_batched_group_completes_only_as_a_whole_under_nccl_semantics(completed):
    assert all(r["batched group, op by op"] for r in completed)
    with pytest.raises(RankFailed, match="NcclHang"):
        launch_local(_group_then_reply, 2, (True,), collective_timeout_s=HANG_TIMEOUT_S, timeout_s=60)
