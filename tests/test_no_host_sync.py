"""No action waits for the device: the forward, loss and backward of split, packed and hybrid
chunks, and the offload and reload of their saved tensors, read no tensor value on the host
(`aten::_local_scalar_dense`, which `.item()` and `bool(tensor)` call and which blocks on a GPU
until the device has caught up)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from chunking import HAND_CHUNKS, HAND_LENGTHS, sequential_plan, with_offload
from infinipipe.contract.ir import Action, downstream_stage, upstream_stage, validate_plan
from infinipipe.contract.model_config import ModelConfig
from infinipipe.runtime.batch import Batch
from infinipipe.runtime.local import build_stages, run_plan_local
from infinipipe.runtime.offload import HostTier, LateCopies, Offloader, late_copy_delay_s, reload_points
from infinipipe.runtime.stage_compute import StageCompute

CFG = ModelConfig(vocab_size=97, hidden=32, layers=4, heads=4, kv_heads=2, ffn=64)


class ScalarReads(TorchDispatchMode):
    """Counts the operator every host read of a tensor value goes through."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_host_reads_in_forward_and_backward():
    x = torch.randn(4, requires_grad=True)
    with ScalarReads() as reads:
        y = (x * 2).sum()
        bool(y > 0)
        y.backward()
        x.grad.max().item()
    assert reads.count == 2


@pytest.mark.parametrize("offload", [False, True], ids=["on-device", "offloaded"])
@pytest.mark.parametrize("chunking", ["packed", "split", "hybrid"])
def test_no_host_reads_inside_any_action_of_a_step(chunking, offload):
    chunks = HAND_CHUNKS[chunking]
    plan = sequential_plan(chunks, HAND_LENGTHS, [2, 2], {c.id: c.id % 3 for c in chunks})
    # Beside the recomputed layers, one elementwise-recompute layer where there is room.
    plan = dataclasses.replace(plan, stage_actions=tuple(
        tuple(Action(a.kind, a.chunk_id, a.recompute_layers, min(1, 2 - a.recompute_layers)) for a in acts)
        for acts in plan.stage_actions))
    if offload:  # and the last layer or two of every chunk that waits for its backward on the host
        modes = {(s, a.chunk_id): (a.recompute_layers, a.elementwise_layers, 1 + a.chunk_id % 2)
                 for s, acts in enumerate(plan.stage_actions) for a in acts}
        plan = with_offload(plan, lambda s, c, n: modes[s, c], min)
    g = torch.Generator().manual_seed(0)
    batch = Batch(tuple(torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in HAND_LENGTHS))
    stages = build_stages(CFG, [2, 2])
    cpu = torch.device("cpu")
    copies = [LateCopies(late_copy_delay_s()) for _ in stages]
    computes = [StageCompute(m, batch, offloader=Offloader(e, HostTier(cpu, 1 << 22), cpu))
                for m, e in zip(stages, copies)]
    reloads = [reload_points(acts) for acts in plan.stage_actions]
    position = {(s, a.kind, a.chunk_id): i for s, acts in enumerate(plan.stage_actions) for i, a in enumerate(acts)}
    outputs, losses, reads = {}, [], ScalarReads()
    for s, a in validate_plan(plan):
        src = upstream_stage(a.kind, s, 2)
        x = outputs.pop((a.kind, src, a.chunk_id)) if src is not None else None
        with reads:
            for cid in reloads[s].get(position[s, a.kind, a.chunk_id], ()):
                computes[s].reload(plan.chunks[cid])
            chunk = plan.chunks[a.chunk_id]
            out = (computes[s].backward(chunk, x) if a.kind == "B" else
                   computes[s].forward(chunk, x, a.recompute_layers, a.elementwise_layers, a.offload_layers))
        if downstream_stage(a.kind, s, 2) is not None:
            outputs[(a.kind, s, a.chunk_id)] = out
        elif a.kind == "F":
            losses.append(out)
    with reads:
        for compute in computes:
            compute.finish()
    for engine in copies:
        engine.close()
    assert reads.count == 0
    assert offload == any(c.offloader.moved_bytes for c in computes)
    # The actions did the step's work: the same loss as the in-process runner.
    assert float(sum(losses)) == pytest.approx(run_plan_local(plan, build_stages(CFG, [2, 2]), batch), rel=1e-6)
