"""Each stage's measured peak memory matches the simulator's prediction for the plan.

What is compared: `StepResult.peak_step_bytes` (every tensor byte the step allocates, counted
by `LiveBytesMeter` in real gloo processes: activations, K/V stores and their gradients, the
running action's transients, the rematerialised layer of a recomputed chunk, gradients,
communication buffers) against `SimResult.peak_step_bytes` (the simulator's whole-stage peak less
the weights that exist before the step). Plans come from the committed CPU profile of the
``tiny`` model; each plan's chunking runs with no, half and full recompute on every chunk, and
with elementwise recompute beside stored or recomputed layers. Plans that offload layers to the
host are compared on the host too: `StepResult.peak_host_bytes` against `SimResult.peak_host_bytes`,
the simulator playing the copies over a link as fast as the CPU's (copies done when issued). A plan
that keeps the optimizer state on the host during the step is compared on both tiers too.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from chunking import with_offload
from infinipipe.contract.cost import CostModel, default_profile
from infinipipe.contract.host import HostLink
from infinipipe.contract.ir import Action, Plan
from infinipipe.contract.model_config import preset
from infinipipe.contract.shapes import ChunkShape
from infinipipe.planners.options import PlannerOptions
from infinipipe.planners.registry import make_plan
from infinipipe.planners.request import PlanRequest
from infinipipe.runtime.batch import Batch
from infinipipe.runtime.executor import PipelineWorker, RuntimeSettings
from infinipipe.runtime.launch import launch_local
from infinipipe.runtime.parallel_dims import ParallelDims
from infinipipe.sim.simulator import simulate

pytestmark = pytest.mark.slow

MODEL = "tiny"
LENGTHS = [4096, 900, 600, 300, 200, 150, 120, 90, 64, 40, 30, 20]
STAGES = 2


# On CPU a copy is done when issued, so the simulator's copies take no time at all: at 1e30 bytes
# per second a copy is shorter than the clock resolves and ends when released (`CopyLanes`). A
# link that is merely fast is not enough: a forward's copy out would still be running at the
# instant the next action starts, and a copy back released there finds both the chunk's source
# and its copy back on the device (a real link's copies do hold both).
INSTANT_LINK = HostLink(h2d_Bps=1e30, d2h_Bps=1e30, h2d_concurrent_Bps=1e30, d2h_concurrent_Bps=1e30,
                        latency_s=0.0, host_memory_bytes=2**40, source="CPU: copies done when issued")


def _cost() -> CostModel:
    return CostModel(dataclasses.replace(default_profile(MODEL), host_link=INSTANT_LINK), preset(MODEL))


def _chunking(name: str) -> Plan:
    """Packed whole sequences, a split into 8 fixed slices, or EPP's split with a hybrid chunk."""
    cost = _cost()
    roomy = 1e12
    if name == "packed":
        return make_plan("batch-1f1b", PlanRequest(LENGTHS, cost, STAGES, roomy))
    if name == "split":
        return make_plan("seq1f1b", PlanRequest(LENGTHS, cost, STAGES, roomy, options=PlannerOptions(chunk_tokens=512)))
    capped = PlannerOptions(num_slices=8, token_capacity=700)  # the second sequence's tail joins short ones
    return make_plan("epp", PlanRequest(LENGTHS, cost, STAGES, roomy, options=capped))


def _with_recompute(plan: Plan, share: tuple[float, float]) -> Plan:
    """Every chunk recomputes ``share[0]`` of each stage's layers whole and ``share[1]`` elementwise."""
    def counts(n: int) -> tuple[int, int]:
        return round(share[0] * n), round(share[1] * n)

    actions = tuple(tuple(a.with_mode(*counts(plan.layers_per_stage[s])) for a in acts)
                    for s, acts in enumerate(plan.stage_actions))
    return dataclasses.replace(plan, stage_actions=actions)


def _with_offload(plan: Plan, share: tuple[float, float], offload: float) -> Plan:
    """`_with_recompute`, and ``offload`` of each stage's layers offloaded for every chunk whose
    backward does not follow its forward, the copy back starting two actions ahead (or as early
    as the forward allows)."""
    plan = _with_recompute(plan, share)
    return with_offload(plan, lambda s, c, n: (round(share[0] * n), round(share[1] * n), round(offload * n)),
                        lambda lo, hi: min(2, hi))


def measure_peaks(plans, layers, host_tier_bytes):
    """Per plan: the step's peak device bytes and peak host-tier bytes."""
    cfg = preset(MODEL)
    g = torch.Generator().manual_seed(0)
    batch = Batch(tuple(torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in LENGTHS))
    worker = PipelineWorker(cfg, layers, ParallelDims(pp=len(layers), dp_replicate=1).build_mesh(),
                            RuntimeSettings(count_live_bytes=True, late_copies=False, host_tier_bytes=host_tier_bytes))
    return [(res.peak_step_bytes, res.peak_host_bytes) for res in (worker.run_step(plan, batch) for plan in plans)]


def test_chunkings_cut_as_named():
    packed, split, hybrid = (_chunking(n) for n in ("packed", "split", "hybrid"))
    assert all(len(c.segments) >= 1 and not ChunkShape.of(c, LENGTHS).prefix for c in packed.chunks)
    assert sum(1 for c in split.chunks if any(s.seq_id == 0 for s in c.segments)) >= 8
    assert any(c.partial_segment(LENGTHS) is not None and len(c.segments) > 1 for c in hybrid.chunks)


CHUNKINGS = ("packed", "split", "hybrid")
SHARES = ((0.0, 0.0), (1.0, 0.0), (0.5, 0.5))  # (whole, elementwise)
# (whole, elementwise), offloaded: stored layers; an elementwise and a stored layer; a recomputed
# layer's checkpoint input and a stored layer.
OFFLOADS = (((0.0, 0.0), 0.5), ((0.0, 0.5), 1.0), ((0.5, 0.0), 1.0))
# (whole, elementwise), where each backward's W runs: every backward's weight gradients left to
# the stage's end (all stashes held at once), one layer recomputed and one stored.
DEFERS = (((0.5, 0.0), "end"),)


def _with_weights(plan: Plan, share: tuple[float, float], where) -> Plan:
    """`_with_recompute`, every backward leaving its weight gradients to a W at ``where``."""
    plan = _with_recompute(plan, share)
    stages = []
    for actions in plan.stage_actions:
        out = list(actions)
        for a in actions:
            if a.kind == "B":
                at = out.index(a) + 1
                out.insert(len(out) if where == "end" else min(at + where, len(out)), Action("W", a.chunk_id))
        stages.append(tuple(out))
    return dataclasses.replace(plan, stage_actions=tuple(stages))


@pytest.fixture(scope="module")
def measured() -> dict[str, tuple[list[Plan], list[list[tuple[int, int]]]]]:
    """Every chunking with each recompute share, then each offload, measured in one launch:
    chunking -> (plans, (device, host) peaks per stage and plan). The host tier holds what the
    simulator predicts from the first step on."""
    bases = {name: _chunking(name) for name in CHUNKINGS}
    (layers,) = {b.layers_per_stage for b in bases.values()}
    plans = [p for name in CHUNKINGS for p in [_with_recompute(bases[name], share) for share in SHARES]
             + [_with_offload(bases[name], *off) for off in OFFLOADS]
             + [_with_weights(bases[name], *d) for d in DEFERS]]
    reserve = int(max(max(simulate(p, _cost()).peak_host_bytes) for p in plans) * 1.5)
    peaks = launch_local(measure_peaks, STAGES, (plans, layers, reserve), timeout_s=300)
    k = len(SHARES) + len(OFFLOADS) + len(DEFERS)
    return {name: (plans[i * k:(i + 1) * k], [stage[i * k:(i + 1) * k] for stage in peaks])
            for i, name in enumerate(CHUNKINGS)}


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_peak_step_bytes_within_10_percent_with_no_half_full_and_elementwise_recompute(chunking, measured):
    plans, peaks = measured[chunking]
    cost = _cost()
    for i, (plan, share) in enumerate(zip(plans, SHARES)):
        predicted = simulate(plan, cost).peak_step_bytes
        for s in range(STAGES):
            got = peaks[s][i][0]
            assert got == pytest.approx(predicted[s], rel=0.10), (
                f"{chunking}, recompute {share[0]:.0%} whole and {share[1]:.0%} elementwise, stage {s}: "
                f"measured {got / 2**20:.2f} MiB, "
                f"simulated {predicted[s] / 2**20:.2f} MiB")


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_offloading_plans_peak_device_and_host_bytes_within_10_percent(chunking, measured):
    plans, peaks = measured[chunking]
    cost = _cost()
    for i, ((share, offload), plan) in enumerate(zip(OFFLOADS, plans[len(SHARES):]), start=len(SHARES)):
        sim = simulate(plan, cost)
        assert max(sim.peak_host_bytes) > 0
        for s in range(STAGES):
            (device, host), label = peaks[s][i], f"{chunking}, recompute {share}, offload {offload:.0%}, stage {s}"
            assert device == pytest.approx(sim.peak_step_bytes[s], rel=0.10), (
                f"{label}: device {device / 2**20:.2f} MiB, simulated {sim.peak_step_bytes[s] / 2**20:.2f} MiB")
            assert host == pytest.approx(sim.peak_host_bytes[s], rel=0.10), (
                f"{label}: host {host / 2**20:.2f} MiB, simulated {sim.peak_host_bytes[s] / 2**20:.2f} MiB")


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_deferred_weight_gradients_peak_step_bytes_within_10_percent(chunking, measured):
    """What a backward keeps for its W (each projection's input and output gradient) is on the
    device from that backward to the W, as the simulator charges it."""
    plans, peaks = measured[chunking]
    cost = _cost()
    first = len(SHARES) + len(OFFLOADS)
    for i, ((share, where), plan) in enumerate(zip(DEFERS, plans[first:]), start=first):
        sim = simulate(plan, cost)
        for s in range(STAGES):
            got = peaks[s][i][0]
            assert got == pytest.approx(sim.peak_step_bytes[s], rel=0.10), (
                f"{chunking}, recompute {share}, W {where}, stage {s}: measured {got / 2**20:.2f} MiB, "
                f"simulated {sim.peak_step_bytes[s] / 2**20:.2f} MiB")


def measure_with_optimizer(plans, layers):
    """Per plan, a step and an AdamW step after it (its moments exist from the first on): the
    step's peak device and host bytes."""
    cfg = preset(MODEL)
    g = torch.Generator().manual_seed(0)
    batch = Batch(tuple(torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in LENGTHS))
    worker = PipelineWorker(cfg, layers, ParallelDims(pp=len(layers), dp_replicate=1).build_mesh(),
                            RuntimeSettings(count_live_bytes=True, late_copies=False))
    optimizer = torch.optim.AdamW(worker.weights.parameters())
    worker.attach_optimizer(optimizer)
    out = []
    for plan in plans:
        res = worker.run_step(plan, batch)
        optimizer.step()
        out.append((res.peak_step_bytes, res.peak_host_bytes))
    return out


def test_an_optimizer_state_on_the_host_is_on_the_host_tier_as_simulated_and_off_the_device_peak():
    """The split chunking with the state on the device, then on the host with its copy back at the
    end, one action before it, and four and two actions before it: the host peak is the
    simulator's and the device peak falls by as much as the simulator's does (as measured: both
    to the byte), within 10% of it. The plan kept on the device runs twice, with the same peaks to
    the byte: what a stage holds is fixed by the Plan, not by how fast its peer took a send."""
    base = _chunking("split")
    parked = [dataclasses.replace(base, metadata={**base.metadata, "offload_optimizer": True,
                                                  "optimizer_reload_lead": leads})
              for leads in ([0, 0], [1, 1], [4, 2])]
    plans = [base, base, *parked]
    peaks = launch_local(measure_with_optimizer, STAGES, (plans, base.layers_per_stage), timeout_s=300)
    cost = _cost()
    kept = simulate(base, cost)
    assert [p[0] for p in peaks] == [p[1] for p in peaks]
    for i, plan in enumerate(parked, start=2):
        sim = simulate(plan, cost)
        for s in range(STAGES):
            (device_kept, _), (device, host) = peaks[s][1], peaks[s][i]
            label = f"leads {plan.metadata['optimizer_reload_lead']}, stage {s}"
            assert sim.peak_host_bytes[s] > 0 and host == pytest.approx(sim.peak_host_bytes[s], rel=1e-6), label
            assert device_kept - device == pytest.approx(kept.peak_step_bytes[s] - sim.peak_step_bytes[s], rel=1e-6), label
            assert device == pytest.approx(sim.peak_step_bytes[s], rel=0.10), label
