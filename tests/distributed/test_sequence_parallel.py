"""Ulysses sequence parallelism over real gloo processes gives the loss and gradients of the
full-sequence run, for packed, split and hybrid chunks, with per-layer recompute; the sp x pp
mesh it runs on places its groups as the rank layout says."""
from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from chunking import HAND_CHUNKS, HAND_LENGTHS, random_chunks, sequential_plan, timed_plan
from infinipipe.contract.model_config import ModelConfig
from infinipipe.planners.schedule import epp_schedule
from infinipipe.runtime.batch import Batch
from infinipipe.runtime.executor import PipelineWorker, RuntimeSettings
from infinipipe.runtime.fsdp import full_gradients
from infinipipe.runtime.full_sequence import reference_loss
from infinipipe.runtime.launch import launch_local
from infinipipe.runtime.local import build_stages, run_plan_local
from infinipipe.runtime.parallel_dims import ParallelDims
from infinipipe.runtime.sequence_parallel import SequenceParallel
from reference_check import assert_matches_reference

pytestmark = pytest.mark.slow

GQA = ModelConfig(vocab_size=97, hidden=32, layers=4, heads=4, kv_heads=2, ffn=64)
ONE_KV_HEAD = ModelConfig(vocab_size=97, hidden=32, layers=4, heads=4, kv_heads=1, ffn=64)
TOL = 1e-4


def _batch(cfg, lengths, seed) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(tuple(torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lengths))


def _reference(cfg, batch):
    (model,) = build_stages(cfg, [cfg.layers], seed=0)
    loss = reference_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def run_sp(setups):
    """Worker: for each (model, layer split, cases), each case on fresh stages; loss and gradients
    summed over the SP group."""
    sp = SequenceParallel.of()
    results = []
    for cfg, layers, cases in setups:
        out = []
        for plan, batch in cases:
            stages = build_stages(cfg, layers, seed=0)
            loss = sp.reduce_loss(run_plan_local(plan, stages, batch, loss_block_tokens=5, sp=sp))
            sp.reduce_gradients(p for m in stages for p in m.parameters())
            out.append((loss, {n: p.grad.clone() for m in stages for n, p in m.named_parameters()}))
        results.append(out)
    return results


def _hand_cases(cfg, layers):
    """Packed (whole sequences), split (slices of one sequence) and hybrid (tail slice + whole)."""
    lengths, chunks = HAND_LENGTHS, HAND_CHUNKS
    batch = _batch(cfg, lengths, 11)
    cases = []
    for name, cs in chunks.items():
        for rec in (0, 2, min(layers)):
            cases.append((f"{name}, recompute {rec}", sequential_plan(cs, lengths, layers, {c.id: rec for c in cs}), batch))
    return cases


def _random_cases(cfg, layers, seeds):
    cases = []
    for seed in seeds:
        rng = random.Random(seed)
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(2, 6))]
        lengths[0] = max(lengths[0], 30)
        chunks = random_chunks(lengths, rng)
        plan = sequential_plan(chunks, lengths, layers, {c.id: rng.randint(0, min(layers)) for c in chunks})
        cases.append((f"seed {seed}, lengths {lengths}", plan, _batch(cfg, lengths, seed)))
    return cases


SETUPS = {"sp2-kv-heads-sharded": (GQA, (4,)), "sp2-kv-heads-repeated": (ONE_KV_HEAD, (4,)),
          "sp2-two-stages-in-process": (GQA, (1, 3))}


@pytest.fixture(scope="module")
def sp_runs() -> dict[str, tuple[list, list]]:
    """Every setup's cases run in one launch of an SP group of 2: setup -> (cases, per-rank results)."""
    cases = {name: _hand_cases(cfg, layers) + _random_cases(cfg, layers, (1, 2, 3))
             for name, (cfg, layers) in SETUPS.items()}
    setups = [(cfg, layers, [(p, b) for _, p, b in cases[name]]) for name, (cfg, layers) in SETUPS.items()]
    results = launch_local(run_sp, 2, (setups,), timeout_s=300)
    return {name: (cases[name], [rank[k] for rank in results]) for k, name in enumerate(SETUPS)}


@pytest.mark.parametrize("setup", SETUPS)
def test_sequence_parallel_loss_and_gradients_equal_full_sequence_reference(setup, sp_runs):
    cfg = SETUPS[setup][0]
    cases, results = sp_runs[setup]
    for i, (name, _, batch) in enumerate(cases):
        ref_loss, ref_grads = _reference(cfg, batch)
        for rank, out in enumerate(results):
            loss, grads = out[i]
            assert_matches_reference(loss, grads, ref_loss, ref_grads, TOL, f"rank {rank}, {name}")


SP_PIPELINE = ParallelDims(pp=2, sp=2)


def run_sp_pipeline(cfg, layers, cases):
    """Worker: an sp x pp mesh (each stage FSDP-sharded over its SP ranks); each case one step of the
    distributed executor. Also this rank's place in the mesh and its SP and pipeline groups."""
    mesh = SP_PIPELINE.build_mesh()
    place = (dist.get_rank(), mesh.stage, mesh.sp_rank, mesh.dp_rank,
             dist.get_process_group_ranks(mesh.sp_group), dist.get_process_group_ranks(mesh.pp_group))
    worker = PipelineWorker(cfg, layers, mesh, RuntimeSettings(seed=0, loss_block_tokens=5, nccl_semantics=True))
    out = []
    for plan, batch in cases:
        res = worker.run_step(plan, batch)
        out.append((res.loss, full_gradients(worker.model)))
    return place, out


@pytest.fixture(scope="module")
def sp_pipeline_run() -> tuple[list, list]:
    """Hand, random and 1F1B cases on sp=2 x pp=2: (cases, per-rank (place in the mesh, results))."""
    layers = (2, 2)
    cases = _hand_cases(GQA, layers) + _random_cases(GQA, layers, (4, 5))
    for seed in (4, 5):
        rng = random.Random(seed)
        lengths = [rng.randint(1, 40) for _ in range(5)]
        chunks = random_chunks(lengths, rng)
        rec = {(s, c.id): rng.randint(0, n) for s, n in enumerate(layers) for c in chunks}
        plan = epp_schedule(chunks, lengths, 2, layers, [[c.id for c in chunks]], recompute=lambda s, c, rec=rec: rec[s, c])
        cases.append((f"1f1b seed {seed}, lengths {lengths}", plan, _batch(GQA, lengths, seed)))
        timed = timed_plan(chunks, lengths, layers, GQA, lambda s, c, rec=rec: rec[s, c], rng)
        cases.append((f"timed order seed {seed}, lengths {lengths}", timed, _batch(GQA, lengths, seed)))
    return cases, launch_local(run_sp_pipeline, 4, (GQA, layers, [(p, b) for _, p, b in cases]), timeout_s=300)


def test_gloo_mesh_matches_rank_layout(sp_pipeline_run):
    """The device mesh over real gloo processes puts SP groups on consecutive ranks and pipeline
    stages outermost, as the pure rank layout says."""
    _, results = sp_pipeline_run
    for (rank, stage, sp_rank, dp_rank, sp_ranks, pp_ranks), _ in results:
        coords = SP_PIPELINE.coords_of(rank)
        assert (stage, sp_rank, dp_rank) == (coords["pp"], coords["sp"], 0)
        assert sp_ranks == [SP_PIPELINE.rank_of(stage, 0, 0, q) for q in range(2)]
        assert pp_ranks == [SP_PIPELINE.rank_of(s, 0, 0, sp_rank) for s in range(2)]


def test_sequence_parallel_times_pipeline_equals_full_sequence_reference(sp_pipeline_run):
    cases, placed = sp_pipeline_run
    results = [(place[1], out) for place, out in placed]
    for i, (name, _, batch) in enumerate(cases):
        ref_loss, ref_grads = _reference(GQA, batch)
        for sp_rank in range(2):
            grads = {}
            for _, out in results[sp_rank::2]:
                grads.update(out[i][1])
            for stage, out in results[sp_rank::2]:
                assert_matches_reference(out[i][0], grads, ref_loss, ref_grads, TOL,
                                         f"stage {stage}, sp rank {sp_rank}, {name}")
