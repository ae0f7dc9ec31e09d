"""The optimizer state waits on the host during a step and comes back exact: the optimizer steps of a
plan with ``offload_optimizer`` equal, bit for bit, those of a state that never left the device,
under late copies too; a removed wait shows; the meter sees the state move from device to host."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from chunking import HAND_CHUNKS, HAND_LENGTHS, sequential_plan, with_offload
from infinipipe.contract.cost import CostModel, default_profile
from infinipipe.contract.host import PUBLISHED_H100_HOST
from infinipipe.contract.ir import Chunk, Plan, Segment
from infinipipe.contract.model_config import ModelConfig, preset
from infinipipe.data.dataset import BatchSampler
from infinipipe.planners.options import PlannerOptions
from infinipipe.planners.schedule import epp_schedule
from infinipipe.planners.stage_layers import balance_layers
from infinipipe.runtime.batch import Batch
from infinipipe.runtime.executor import PipelineWorker, RuntimeSettings
from infinipipe.runtime.launch import launch_local
from infinipipe.runtime.offload import LATE_COPIES_MS_VAR, LateCopies
from infinipipe.runtime.optimizer_host import optimizer_back_at, optimizer_out_wait
from infinipipe.runtime.parallel_dims import ParallelDims
from infinipipe.sim.simulator import simulate
from infinipipe.train.planning import StepPlanner

CFG = ModelConfig(vocab_size=97, hidden=32, layers=4, heads=4, kv_heads=2, ffn=64)
SPLIT = (2, 2)
STEPS = 3
PRECISIONS = {"fp32": (torch.float32, None), "bf16-master": (torch.bfloat16, torch.float32)}


def _batch(lengths, seed=5) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(tuple(torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in lengths))


# Sequences long enough that a step's activations outweigh the optimizer state, whole, every
# forward before any backward: the device peaks mid-step, with the state on the host.
LONG = [256, 192, 128]


def _plan(leads: list[int | None] | None, split=SPLIT, long=False) -> Plan:
    """The split chunking in EPP's 1F1B order (or `LONG` in order); ``leads`` (per stage) keep
    the optimizer state on the host (None: never); with `OUT_WAIT`'s leads every stage's first
    action also waits for the copy out."""
    if long:
        plan = sequential_plan([Chunk(i, (Segment(i, 0, n),)) for i, n in enumerate(LONG)], LONG, split)
    else:
        plan = epp_schedule(HAND_CHUNKS["split"], HAND_LENGTHS, len(split), list(split))
    if leads is None:
        return plan
    wait = {"optimizer_out_wait": [True] * len(split)} if tuple(leads) == OUT_WAIT else {}
    return dataclasses.replace(plan, metadata={**plan.metadata, "offload_optimizer": True,
                                               "optimizer_reload_lead": list(leads), **wait})


def train(split, precision, late, leads, steps=STEPS, count=False, long=False):
    """Worker: ``steps`` AdamW steps of one plan; per step the loss, the stage's weights and
    optimizer state after it, the step's device and host peaks (counted by the meter), the
    state's bytes and the most bytes the host tier held."""
    dtype, master = PRECISIONS[precision]
    mesh = ParallelDims(pp=len(split)).build_mesh()
    worker = PipelineWorker(CFG, split, mesh, RuntimeSettings(dtype=dtype, master_dtype=master, late_copies=late,
                                                              count_live_bytes=count))
    optimizer = torch.optim.AdamW(worker.weights.parameters(), lr=1e-2, weight_decay=0.1)
    worker.attach_optimizer(optimizer)
    plan, batch = _plan(leads, split, long), _batch(LONG if long else HAND_LENGTHS)
    out = []
    for _ in range(steps):
        moved = sum(t.untyped_storage().nbytes() for t in worker.optimizer_state())
        res = worker.run_step(plan, batch)
        optimizer.step()
        worker.refresh()
        out.append((res.loss, [p.detach().clone() for p in worker.weights.parameters()],
                    [t.clone() for t in worker.optimizer_state()], res.peak_step_bytes, res.peak_host_bytes, moved,
                    worker.host_tier.in_use_peak))
    worker.copies.close()
    return out


def train_cases(cases):
    return [train(*case) for case in cases]


OUT_WAIT = (0, 1)
LEADS = (list(OUT_WAIT), [3, None], [len(_plan(None).stage_actions[0]), 2])


@pytest.fixture(scope="module")
def runs():
    """(precision, late, leads) -> per stage the steps of `train`; leads None: the reference."""
    keys = [(p, late, leads) for p in PRECISIONS for late in (False, True) for leads in (None, *LEADS)]
    cases = [(SPLIT, p, late, leads) for p, late, leads in keys]
    per_rank = launch_local(train_cases, len(SPLIT), (cases,), timeout_s=240)
    return {(p, late, None if leads is None else tuple(leads)): [rank[i] for rank in per_rank]
            for i, (p, late, leads) in enumerate(keys)}


@pytest.mark.parametrize("leads", LEADS, ids=lambda leads: "-".join(map(str, leads)))
@pytest.mark.parametrize("late", [False, True], ids=["immediate", "late-copies"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_optimizer_steps_with_the_state_on_the_host_equal_the_device_ones_bit_for_bit(precision, late, leads, runs):
    """Leads of 0 (copy back after the last action), 1, 3 and every action (back at the first, before
    the copy out is known done); a stage with lead None keeps its state and moves nothing; the
    first leads with every stage's first action waiting for the copy out (late copies: an
    emptied storage the copy had not read would come back as garbage)."""
    reference, got = runs[precision, late, None], runs[precision, late, tuple(leads)]
    for stage, (ref_steps, steps) in enumerate(zip(reference, got)):
        for step, (ref, run) in enumerate(zip(ref_steps, steps)):
            moved, on_host = run[5], run[6]
            assert on_host == (0 if leads[stage] is None else moved), f"host bytes, stage {stage}, step {step}"
            assert run[0] == ref[0], (stage, step)
            assert all(torch.equal(a, b) for a, b in zip(run[1], ref[1])), f"weights, stage {stage}, step {step}"
            assert len(run[2]) == len(ref[2]) and all(torch.equal(a, b) for a, b in zip(run[2], ref[2])), (
                f"optimizer state, stage {stage}, step {step}")


def test_a_stage_with_lead_none_keeps_its_state_and_offload_optimizer_off_moves_nothing():
    plan = _plan([3, None])
    assert optimizer_back_at(plan, 0) == len(plan.stage_actions[0]) - 3 and optimizer_back_at(plan, 1) is None
    assert optimizer_back_at(_plan(None), 0) is None
    with pytest.raises(ValueError, match="one entry per stage"):
        optimizer_back_at(dataclasses.replace(plan, metadata={"offload_optimizer": True}), 0)
    with pytest.raises(ValueError, match="outside its"):
        optimizer_back_at(_plan([99, 0]), 0)
    assert not optimizer_out_wait(plan, 0) and optimizer_out_wait(_plan(list(OUT_WAIT)), 1)
    waiting = dataclasses.replace(plan, metadata={**plan.metadata, "optimizer_out_wait": [True, True]})
    assert optimizer_out_wait(waiting, 0) and not optimizer_out_wait(waiting, 1)  # stage 1 keeps its state
    with pytest.raises(ValueError, match="one entry per stage"):
        optimizer_out_wait(dataclasses.replace(plan, metadata={**plan.metadata, "optimizer_out_wait": [True]}), 0)


def train_without_a_wait(precision):
    """`train` with a lead of 0 and the compute stream's waits for copies removed."""
    LateCopies.compute_waits = lambda self, event: None
    return train((CFG.layers,), precision, True, [0], steps=2)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_late_copies_turn_an_optimizer_step_that_does_not_wait_for_the_copy_back_into_a_wrong_step(
        precision, monkeypatch):
    monkeypatch.setenv(LATE_COPIES_MS_VAR, "300")
    ((reference,),) = launch_local(train_cases, 1, ([((CFG.layers,), precision, True, None, 2)],), timeout_s=120)
    (got,) = launch_local(train_without_a_wait, 1, (precision,), timeout_s=120)
    _, ref_weights, ref_state, *_ = reference[-1]
    _, weights, state, *_ = got[-1]
    assert not all(torch.equal(a, b) for a, b in zip(weights + state, ref_weights + ref_state))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_meter_counts_the_moved_state_on_the_host_and_the_device_peak_falls_by_it(precision):
    """Step 2 (AdamW's moments exist from the first step on), lead 0: the host holds exactly the
    state's bytes, and the device peaks lower by them (the peak falls at the end of the forwards,
    where the state is away: measured exactly, compared within 1%)."""
    cases = [((CFG.layers,), precision, False, leads, 2, True, True) for leads in (None, [0])]
    ((kept, parked),) = launch_local(train_cases, 1, (cases,), timeout_s=120)
    (*_, device, host, moved, _), (*_, device_parked, host_parked, moved_parked, _) = kept[1], parked[1]
    assert moved == moved_parked > 0 and host == 0
    assert host_parked == moved
    assert device - device_parked == pytest.approx(moved, rel=0.01)


def test_the_step_planner_predicts_each_stages_host_peak_with_the_plans():
    """The trainer's planning process simulates the plans it hands out: each rank's host room is
    its stage's simulated host peak (here the optimizer state's bytes and offloaded activations)."""
    cost = CostModel(dataclasses.replace(default_profile("tiny"), host_link=PUBLISHED_H100_HOST), preset("tiny"))
    lengths = np.array([4096, 2000, 900, 300, 120] * 2)
    planner = StepPlanner(cost, BatchSampler(lengths, 0, global_batch_tokens=4096), "epp", 2, 1, 2**30,
                          balance_layers(cost, 2), PlannerOptions(time_limit_s=1.0), host_memory_budget=2**30)
    sp = planner(0)
    (plan,) = sp.plans
    sim = simulate(plan, cost, 2**30)
    assert plan.metadata["offload_optimizer"]
    assert [sp.host_room(0, s) for s in range(2)] == [math.ceil(b) for b in sim.peak_host_bytes]
    assert all(sp.host_room(0, s) > 0 for s, lead in enumerate(plan.metadata["optimizer_reload_lead"])
               if lead is not None)


def first_step_tier(room):
    """Worker: the host tier's most bytes in use in a worker's first step, given ``room``."""
    split = (2, 3)
    plan = with_offload(sequential_plan(HAND_CHUNKS["split"], HAND_LENGTHS, split), lambda s, c, n: (0, 0, n))
    worker = PipelineWorker(dataclasses.replace(CFG, layers=5), split, ParallelDims(pp=2).build_mesh())
    worker.run_step(plan, _batch(HAND_LENGTHS), host_room=room)
    return worker.host_tier.in_use_peak


def test_a_first_step_given_its_predicted_host_room_offloads_and_one_without_keeps_activations_on_the_device():
    without, given = (launch_local(first_step_tier, 2, (room,), timeout_s=120) for room in (0, 1 << 22))
    assert without == [0, 0] and all(b > 0 for b in given)
