"""Training steps whose plans keep the optimizer state on the host during the step, across real gloo
processes under NCCL's waiting rules and with copies completing late, give the losses, weights and
optimizer state of the same steps with the state on the device, bit for bit: replicated stages
(mixed precision's master weights and moments) and FSDP stages (their local shards)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from test_exact_pipeline import CFG, _cases

from infinipipe.contract.ir import Plan
from infinipipe.runtime.executor import PipelineWorker, RuntimeSettings
from infinipipe.runtime.fsdp import full_tensor
from infinipipe.runtime.launch import launch_local
from infinipipe.runtime.parallel_dims import ParallelDims

pytestmark = pytest.mark.slow

STEPS = 3
PRECISIONS = {"fp32": (torch.float32, None), "bf16-master": (torch.bfloat16, torch.float32)}
# Per stage: after the last action and one action before it; at the first action (before the copy
# out is known done) and never (the state stays on the device).
LEADS = ((0, 1), ("all", None))


def _with_leads(plan: Plan, leads: tuple) -> Plan:
    back = [len(actions) if lead == "all" else lead for lead, actions in zip(leads, plan.stage_actions)]
    return dataclasses.replace(plan, metadata={**plan.metadata, "offload_optimizer": True, "optimizer_reload_lead": back})


def train(dims: ParallelDims, layers: tuple[int, ...], precision: str, cases):
    """Worker: per leads (None: the state stays), a fresh worker trains ``STEPS`` AdamW steps over
    the cases' plans in turn; its losses, whole weights and optimizer state, and the host tier's
    most bytes in use."""
    dtype, master = PRECISIONS[precision]
    mesh = dims.build_mesh()
    out = {}
    for leads in (None, *LEADS):
        worker = PipelineWorker(CFG, layers, mesh, RuntimeSettings(
            dtype=dtype, master_dtype=master, seed=0, loss_block_tokens=7, nccl_semantics=True, late_copies=True,
            host_tier_bytes=1 << 22))
        optimizer = torch.optim.AdamW(worker.weights.parameters(), lr=1e-2, weight_decay=0.1)
        worker.attach_optimizer(optimizer)
        losses, on_host = [], []
        for step in range(STEPS):
            plans, batches = cases[step % len(cases)]
            plan = plans[mesh.dp_rank] if leads is None else _with_leads(plans[mesh.dp_rank], leads)
            res = worker.run_step(plan, batches[mesh.dp_rank])
            optimizer.step()
            worker.refresh()
            losses.append(res.loss)
            on_host.append(worker.host_tier.in_use_peak)
        state = [full_tensor(t).clone() for t in worker.optimizer_state()]
        weights = [full_tensor(p.detach()).clone() for p in worker.weights.parameters()]
        out[leads] = (losses, weights, state, on_host)
        worker.copies.close()
    return mesh.stage, out


MESHES = {"dp2xpp2": (ParallelDims(pp=2, dp_replicate=2), (2, 2)),
          "dp_shard2xpp2": (ParallelDims(pp=2, dp_shard=2), (2, 2))}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("mesh", MESHES)
def test_steps_with_the_optimizer_state_on_the_host_equal_the_device_ones(mesh, precision):
    dims, layers = MESHES[mesh]
    cases, _, names = _cases(dims.pp, layers, (4,), dims.dp)
    picked = [c for c, n in zip(cases, names) if "offload" in n or "epp" in n]
    results = launch_local(train, dims.world_size, (dims, layers, precision, picked), timeout_s=300)
    for stage, out in results:
        ref_losses, ref_weights, ref_state, ref_on_host = out[None]
        for leads in LEADS:
            losses, weights, state, on_host = out[leads]
            label = f"{mesh}, {precision}, leads {leads}, stage {stage}"
            assert losses == ref_losses, label
            assert all(torch.equal(a, b) for a, b in zip(weights, ref_weights)), label
            assert len(state) == len(ref_state) and all(torch.equal(a, b) for a, b in zip(state, ref_state)), label
            state_bytes = [a - b for a, b in zip(on_host, ref_on_host)]  # the tier holds activations too
            assert max(state_bytes) > 0 if leads[stage] is not None else not any(state_bytes), label
