"""Plans run across real gloo processes, under NCCL's waiting rules and with offload copies completing
late, give the loss and gradients of the full-sequence run."""
from __future__ import annotations

import random

import pytest
import torch

from chunking import random_chunks, sequential_plan, timed_plan, with_offload, with_weight_actions
from infinipipe.contract.cost import CostModel, LinearTerm, Profile
from infinipipe.contract.ir import Plan, validate_plan
from infinipipe.contract.model_config import ModelConfig
from infinipipe.planners.compose import join_plans
from infinipipe.planners.data_parallel import split_batch, whole_sequence_cost
from infinipipe.planners.grouping import sequence_units, sub_batch
from infinipipe.planners.schedule import Order, epp_schedule
from infinipipe.runtime.batch import Batch
from infinipipe.runtime.executor import PipelineWorker, RuntimeSettings
from infinipipe.runtime.full_sequence import reference_loss
from infinipipe.runtime.launch import launch_local
from infinipipe.runtime.local import build_stages
from infinipipe.runtime.parallel_dims import ParallelDims
from reference_check import assert_matches_reference

pytestmark = pytest.mark.slow

CFG = ModelConfig(vocab_size=97, hidden=32, layers=4, heads=4, kv_heads=2, ffn=64)
TOL = 1e-4
PLANNERS = ("epp", "batch-1f1b", "seq1f1b", "gpipe")


def synthetic_cost() -> CostModel:
    """Plausible coefficients for planning only: exactness must hold whatever the planner decides."""
    prof = Profile(model=CFG, device="cpu", dtype="float32",
                   layer_fwd=LinearTerm({"attn": 2e-5, "tokens": 2e-3, "chunk": 0.05}),
                   layer_bwd=LinearTerm({"attn": 4e-5, "tokens": 4e-3, "chunk": 0.1}),
                   layer_act_bytes=LinearTerm({"tokens": 40 * CFG.hidden, "mask_area": 16}),
                   head_fwd=LinearTerm({"tokens": 1e-3}), head_bwd=LinearTerm({"tokens": 2e-3}),
                   layer_elementwise_bytes=LinearTerm({"tokens": 4 * (2 * CFG.hidden + CFG.ffn)}),
                   layer_elementwise_ms=LinearTerm({"tokens": 2e-4}))
    return CostModel(prof, CFG)


def _batch(lengths, seed) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(tuple(torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in lengths))


def _reference(batch: Batch):
    (model,) = build_stages(CFG, [CFG.layers], seed=0)
    loss = reference_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _pipelines_by_sequence(chunks, lengths, groups: int) -> list[list[int]]:
    """Chunks of one split sequence stay together; the groups go round-robin."""
    owner = {}
    for c in chunks:
        part = next((s.seq_id for s in c.segments if s.length < lengths[s.seq_id]), None)
        owner[c.id] = ("seq", part) if part is not None else ("chunk", c.id)
    keys = list(dict.fromkeys(owner.values()))
    pipes = [[c.id for c in chunks if keys.index(owner[c.id]) % groups == g] for g in range(groups)]
    return [p for p in pipes if p]


def _offload_modes(layers, chunks, rng: random.Random) -> dict[tuple[int, int], tuple[int, int, int]]:
    """Per stage and chunk: layers recomputed whole, elementwise, and offloaded (at least one)."""
    modes = {}
    for s, n in enumerate(layers):
        for c in chunks:
            whole = rng.randint(0, n)
            modes[s, c.id] = (whole, rng.randint(0, n - whole), rng.randint(1, n))
    return modes


def hand_plans(lengths, layers, rng: random.Random) -> dict[str, Plan]:
    """Random chunkings as GPipe-order plans and as EPP 1F1B plans with several pipelines, one of
    them offloading some layers of every chunk that waits for its backward and leaving most
    backwards' weight gradients to W actions."""
    chunks = random_chunks(lengths, rng)
    rec = {c.id: rng.randint(0, min(layers)) for c in chunks}
    pipes = _pipelines_by_sequence(chunks, lengths, 2)
    per_stage = {(s, c.id): rng.randint(0, n) for s, n in enumerate(layers) for c in chunks}
    modes = _offload_modes(layers, chunks, rng)
    offloading = with_weight_actions(with_offload(epp_schedule(chunks, lengths, len(layers), layers, pipes),
                                                  lambda s, c, n: modes[s, c], lambda lo, hi: rng.randint(lo, hi)), rng)
    return {
        "1f1b-multi-pipeline+offload+deferred-weights": offloading,
        "sequential+recompute": sequential_plan(chunks, lengths, layers, rec),
        "1f1b-multi-pipeline+recompute": epp_schedule(chunks, lengths, len(layers), layers, pipes,
                                                      recompute=lambda s, c: per_stage[s, c]),
        "1f1b-whole-chunks-between-split-sequences+recompute": epp_schedule(
            chunks, lengths, len(layers), layers, recompute=lambda s, c: per_stage[s, c], order=Order("interleaved")),
        "parts-planned-apart-and-joined": joined_parts(chunks, lengths, layers, rng),
        "timed-order-multi-pipeline+recompute": timed_plan(chunks, lengths, layers, CFG,
                                                           lambda s, c: per_stage[s, c], rng, pipes),
    }


def joined_parts(chunks, lengths, layers, rng: random.Random) -> Plan:
    """Each sequence unit scheduled as a batch of its own (random recompute), the parts joined."""
    parts = []
    for ids in sequence_units(chunks):
        sub, sub_lengths = sub_batch(chunks, lengths, ids)
        seq_ids = list(dict.fromkeys(s.seq_id for c in ids for s in chunks[c].segments))
        rec = {(s, c.id): rng.randint(0, n) for s, n in enumerate(layers) for c in sub}
        parts.append((epp_schedule(sub, sub_lengths, len(layers), layers, recompute=lambda s, c, rec=rec: rec[s, c]), seq_ids))
    plan = join_plans(parts, lengths)
    validate_plan(plan)
    return plan


def planner_plans(lengths, layers) -> dict[str, Plan]:
    """Each planner on a synthetic cost model; a tight budget first, so EPP splits and recomputes."""
    from infinipipe.planners.options import PlannerOptions
    from infinipipe.planners.registry import make_plan
    from infinipipe.planners.request import PlanRequest

    cost = synthetic_cost()
    states = max(cost.model_state_bytes(n, s == 0, s == len(layers) - 1) for s, n in enumerate(layers))
    opts = PlannerOptions(micro_batch_tokens=40, chunk_tokens=12, recompute=1, num_slices=3)
    out = {}
    for name in PLANNERS:
        for extra in (5e4, 1e6, 1e9):
            try:
                out[name] = make_plan(name, PlanRequest(lengths, cost, len(layers), states + extra, layers, opts))
                break
            except ValueError:
                continue
        else:
            raise AssertionError(f"planner {name} found no plan for lengths {lengths}")
    return out


def run_cases(dp: int, pp: int, layers: tuple[int, ...], cases):
    """Worker: one mesh, one stage model, every case a step; returns grads per (replica, stage)."""
    mesh = ParallelDims(pp=pp, dp_replicate=dp).build_mesh()
    settings = RuntimeSettings(seed=0, loss_block_tokens=7, nccl_semantics=True, late_copies=True, host_tier_bytes=1 << 22)
    worker = PipelineWorker(CFG, layers, mesh, settings)
    out = []
    for plans, batches in cases:
        res = worker.run_step(plans[mesh.dp_rank], batches[mesh.dp_rank])
        grads = {n: p.grad.clone() for n, p in worker.model.named_parameters()}
        out.append((res.loss, grads, worker.host_tier.in_use_peak))
    return mesh.dp_rank, mesh.stage, out


def check_all(results, refs, names):
    for i, (ref_loss, ref_grads) in enumerate(refs):
        for dp_rank in {r[0] for r in results}:
            grads = {}
            for d, _, out in results:
                if d == dp_rank:
                    loss, g, _ = out[i]
                    grads.update(g)
            assert_matches_reference(loss, grads, ref_loss, ref_grads, TOL, names[i])


def _cases(pp, layers, seeds, dp=1):
    cases, refs, names = [], [], []
    for seed in seeds:
        rng = random.Random(seed)
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(dp + 1, 6))]
        lengths[0] = max(lengths[0], 30)
        batch = _batch(lengths, seed)
        shares = split_batch(lengths, dp, whole_sequence_cost(synthetic_cost()))
        local = [Batch(tuple(batch.sequences[i] for i in share)) for share in shares]
        per_replica = [hand_plans(b.lengths, layers, rng) for b in local]
        more = [planner_plans(b.lengths, layers) for b in local]
        for name in list(per_replica[0]) + list(more[0]):
            plans = [{**h, **m}[name] for h, m in zip(per_replica, more)]
            cases.append((plans, local))
            refs.append(_reference(batch))
            names.append(f"seed {seed}, {name}, lengths {lengths}")
    return cases, refs, names


MESHES = {"pp2": (1, 2, (1, 3), (1, 2)), "pp4": (1, 4, (1, 1, 1, 1), (3,)), "dp2xpp2": (2, 2, (2, 2), (4,))}


def run_meshes(runs):
    """Worker: each (dp, pp, layers, cases) on its own mesh over the same processes."""
    return [run_cases(*run) for run in runs]


@pytest.fixture(scope="module")
def mesh_runs() -> dict[str, tuple]:
    """Every mesh's cases, one launch per world size: mesh -> (cases, refs, names, per-rank results)."""
    out = {}
    by_world: dict[int, list[str]] = {}
    for name, (dp, pp, _, _) in MESHES.items():
        by_world.setdefault(dp * pp, []).append(name)
    for world, names in by_world.items():
        made = {n: _cases(MESHES[n][1], MESHES[n][2], MESHES[n][3], MESHES[n][0]) for n in names}
        runs = [(*MESHES[n][:3], made[n][0]) for n in names]
        results = launch_local(run_meshes, world, (runs,), timeout_s=240)
        out |= {n: (*made[n], [rank[k] for rank in results]) for k, n in enumerate(names)}
    return out


@pytest.mark.parametrize("mesh", MESHES)
def test_multiprocess_loss_and_gradients_equal_full_sequence_reference(mesh, mesh_runs):
    _, refs, names, results = mesh_runs[mesh]
    check_all(results, refs, names)
    offloading = [i for i, name in enumerate(names) if "offload" in name]
    assert offloading and all(max(out[i][2] for *_, out in results) > 0 for i in offloading)
