"""MEASURED pipeline iteration time of EPP and baselines on this machine, next to the simulator.

Each planner plans the same skewed batch of the ``tiny`` model; the plan runs on real processes
(gloo, one process per stage, one thread each) and the table prints the measured iteration time
(median over steps of the slowest stage's pipeline phase; the plans take turns, a step each, so
that every plan meets the same spells of a busy machine) and each stage's measured peak step
bytes (every allocation, counted in a separate untimed step), beside what the simulator
predicts with the committed CPU profile. As an outside reference the same batch goes through
``torch.distributed.pipelining.Schedule1F1B``: it needs micro-batches of equal shape, so
sequences are packed into rows of the longest sequence's length and padded (the padding fraction
is printed); each row keeps per-document causal attention.

Every process runs one intra-op thread. Profiles time the measuring thread's CPU time, which
leaves out the time other processes hold the cores, while the pipeline is timed on the wall clock;
so before simulating, every time term of the profile is scaled by the wall time a layer takes
here with as many processes running layers at once as the pipeline has stages (printed). On a
machine with fewer free cores than stages measured times are longer for that reason alone.

The link between stage processes is measured first (a gloo ping-pong of a small and a large
tensor: latency and bandwidth, printed) and every planner and the simulator price sends on it.

The committed CPU profile is used only if this machine runs its layer shapes within 5% of it
(the runtime's per-action overhead is then measured here and added); otherwise the machine is
re-profiled first, and the output says which.

EPP's chunks also run in both orders, whatever the search chose: the 1F1B order (a fixed
warm-up) and a timed order (each stage's interleaving from a list schedule, `timed_order`), each
checkpointed by the ILP, so the two schedules are compared measured and simulated on one batch.

Usage: ``python benchmarks/measured_pipeline.py [--stages 2] [--steps 3] [--model small --longest
4096]``; on a 16-core machine
``--stages 8 --model small`` (the ``tiny`` model has only 4 layers).
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from infinipipe.contract.cost import CostModel, LinearTerm, Profile, default_profile, default_profile_name
from infinipipe.contract.layout import LinkModel
from infinipipe.contract.model_config import preset
from infinipipe.contract.shapes import ChunkShape
from infinipipe.model.layers import ChunkMeta
from infinipipe.model.stage import StageModel, init_weights
from infinipipe.planners.ilp import solve_checkpointing
from infinipipe.planners.registry import make_plan
from infinipipe.planners.request import PlanRequest
from infinipipe.planners.schedule import Order, epp_schedule
from infinipipe.profiling.measure import LayerBench, measure_action_overhead, profile_device
from infinipipe.runtime.batch import Batch
from infinipipe.runtime.executor import PipelineWorker, RuntimeSettings
from infinipipe.runtime.launch import RankFailed, launch_local
from infinipipe.runtime.parallel_dims import ParallelDims
from infinipipe.sim.simulator import simulate

PLANNERS = ("epp", "batch-1f1b", "seq1f1b")
PING_BYTES = (256, 4 << 20)


def ping_pong(reps: int = 30) -> list[float]:
    """Median seconds of a one-way gloo send between ranks 0 and 1 (half a round trip), per size
    in PING_BYTES: what a stage's send to the next stage costs here."""
    rank = dist.get_rank()
    out = []
    for size in PING_BYTES:
        x = torch.zeros(size // 4)
        times = []
        for _ in range(reps + 3):
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(x, 1)
                dist.recv(x, 1)
            elif rank == 1:
                dist.recv(x, 0)
                dist.send(x, 0)
            times.append((time.perf_counter() - t0) / 2)
        out.append(statistics.median(times[3:]))
    return out


def measure_link(stages: int) -> LinkModel:
    """The link between this machine's stage processes (loopback gloo, one thread each), from a
    small and a large ping-pong: latency and bandwidth, as the simulator prices a send."""
    small, large = launch_local(ping_pong, stages, (), timeout_s=120)[0]
    return LinkModel(latency_s=small, bandwidth_Bps=(PING_BYTES[1] - PING_BYTES[0]) / max(large - small, 1e-9))


def skewed_lengths(seed: int, longest: int = 2048) -> list[int]:
    """A long-tailed batch: one long document, a few medium ones, many short ones."""
    rng = random.Random(seed)
    return ([longest, longest * 3 // 8, longest // 4] + [rng.randint(64, 256) for _ in range(6)]
            + [rng.randint(8, 64) for _ in range(12)])


def in_orders(plan, cost, memory, link) -> dict[str, object]:
    """``plan``'s chunks and pipelines in the 1F1B order and in a timed one, each checkpointed."""
    out = {}
    for name, order in (("epp 1f1b", Order()), ("epp timed", Order("timed", plan.num_stages, 2))):
        bare = epp_schedule(plan.chunks, plan.seq_lengths, plan.num_stages, plan.layers_per_stage, plan.pipelines,
                            metadata={"memory_budget": memory}, order=order, cost=cost, link=link)
        out[name] = solve_checkpointing(bare, cost, memory)
    return out


def run_plans(model, plans, batch, layers, steps):
    """Timed steps first, in rounds of one step per plan (a warm-up round first), so that every
    plan meets the same spells of a busy machine; then one step per plan with every allocation
    counted (that slows each op, so it is kept out of the timing) for each stage's peak."""
    mesh = ParallelDims(pp=len(layers), dp_replicate=1).build_mesh()
    timed = PipelineWorker(preset(model), layers, mesh, RuntimeSettings())
    counted = PipelineWorker(preset(model), layers, mesh, RuntimeSettings(count_live_bytes=True))
    rounds = [[timed.run_step(plan, batch) for plan in plans] for _ in range(steps + 1)][1:]
    peaks = [counted.run_step(plan, batch).peak_step_bytes for plan in plans]
    return [[(r[i].pipeline_s, r[i].busy_s, peaks[i]) for r in rounds] for i in range(len(plans))]


def pack_rows(lengths: list[int], row: int) -> list[list[int]]:
    """First-fit decreasing: sequence ids per row of ``row`` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        j = next((k for k, r in enumerate(room) if r >= lengths[i]), None)
        if j is None:
            rows.append([])
            room.append(row)
            j = len(rows) - 1
        rows[j].append(i)
        room[j] -= lengths[i]
    return rows


class _PackedStage(torch.nn.Module):
    """A `StageModel` over padded rows; the row's document boundaries come in micro-batch order."""

    def __init__(self, model: StageModel, metas: list[ChunkMeta]):
        super().__init__()
        self.model, self.metas, self.calls = model, metas, 0

    def forward(self, x):
        meta = self.metas[self.calls % len(self.metas)]
        self.calls += 1
        h = self.model.embed_tokens(x[0]) if self.model.first else x[0]
        for layer in self.model.ordered_layers():
            h = layer(h, meta)
        return (self.model.head(self.model.norm(h)) if self.model.last else h).unsqueeze(0)


def run_torch_1f1b(model_name, batch, layers, rows, steps):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    cfg = preset(model_name)
    stage, n = dist.get_rank(), dist.get_world_size()
    width = max(batch.lengths)
    tokens, labels, metas = [], [], []
    for ids in rows:
        pad = width - sum(batch.lengths[i] for i in ids)
        seqs = [batch.sequences[i] for i in ids]
        tokens.append(torch.cat(seqs + [torch.zeros(pad, dtype=torch.long)]))
        labels.append(torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in seqs]
                                + [torch.full((pad,), -100, dtype=torch.long)]))
        metas.append(ChunkMeta.build([batch.lengths[i] for i in ids] + ([pad] if pad else []), [0] * (len(ids) + (pad > 0))))
    lo = sum(layers[:stage])
    model = StageModel(cfg, range(lo, lo + layers[stage]), first=stage == 0, last=stage == n - 1)
    init_weights(model, 0)
    norm = batch.predicted_tokens

    def loss_fn(logits, target):
        return F.cross_entropy(logits[0], target[0], ignore_index=-100, reduction="sum") / norm

    inp = torch.zeros(1, width, dtype=torch.long) if stage == 0 else torch.zeros(1, width, cfg.hidden, requires_grad=True)
    # Outputs carry requires_grad: torch derives from it whether a gradient comes back.
    out = torch.zeros(1, width, cfg.vocab_size if stage == n - 1 else cfg.hidden, requires_grad=True)
    pstage = PipelineStage(_PackedStage(model, metas), stage, n, torch.device("cpu"), input_args=(inp,), output_args=(out,))
    schedule = Schedule1F1B(pstage, len(rows), loss_fn=loss_fn)
    times = []
    for _ in range(steps + 1):
        model.zero_grad(set_to_none=True)
        dist.barrier()
        t0 = time.perf_counter()
        if stage == 0:
            schedule.step(torch.stack(tokens))
        elif stage == n - 1:
            schedule.step(target=torch.stack(labels))
        else:
            schedule.step()
        times.append(time.perf_counter() - t0)
    return times[1:]


HOST_TOLERANCE = 0.05
CHECK_SHAPES = (ChunkShape((512,)), ChunkShape((1024,)), ChunkShape((256,) * 4))


def speed_ratio(model: str, prof: Profile, wall: bool = False) -> float:
    """A layer's forward and backward here over ``prof``'s prediction (the median over
    CHECK_SHAPES): the measuring thread's CPU time, as profiles are timed, or with ``wall`` the
    wall clock, which also counts the time other processes hold the cores."""
    torch.set_num_threads(1)
    bench = LayerBench(preset(model), layers=1, warmup=2, reps=5)
    ratios = []
    for shape in CHECK_SHAPES:
        runs = []
        for _ in range(bench.warmup + bench.reps):
            t0 = time.perf_counter()
            fwd, bwd = bench.time_once(shape)
            runs.append((fwd, bwd, (time.perf_counter() - t0) * 1e3))
        runs = runs[bench.warmup:]
        measured = (statistics.median(w for *_, w in runs) if wall
                    else statistics.median(f for f, *_ in runs) + statistics.median(b for _, b, _ in runs))
        ratios.append(measured / (prof.layer_fwd(shape) + prof.layer_bwd(shape)))
    return statistics.median(ratios)


def profile_for_this_host(model: str, longest: int) -> tuple[Profile, str]:
    """The committed CPU profile if this machine runs its layer shapes within HOST_TOLERANCE of
    it (with the runtime's per-action overhead measured here added), else a fresh profile of
    this machine: a CPU profile does not carry over between hosts."""
    cfg, prof = preset(model), default_profile(model)
    ratio = speed_ratio(model, prof)
    if abs(ratio - 1) <= HOST_TOLERANCE:
        fwd, bwd = measure_action_overhead(cfg, "cpu", "float32", prof.layer_fwd, prof.layer_bwd)
        prof = dataclasses.replace(prof, action_fwd=LinearTerm({"chunk": fwd}), action_bwd=LinearTerm({"chunk": bwd}))
        return prof, (f"committed profile {default_profile_name(model)} (this machine runs its layers at x{ratio:.2f} "
                      f"of it; per-action overhead measured here: {fwd:.3f} ms forward, {bwd:.3f} ms backward)")
    t0 = time.perf_counter()
    prof, _, _ = profile_device(cfg, layers=2, max_tokens=max(2048, longest), passes=1, reps=5, warmup=2,
                                progress=False, name=model)
    return prof, (f"RE-PROFILED this machine in {time.perf_counter() - t0:.0f} s: it runs the committed profile's "
                  f"layers at x{ratio:.2f}, beyond +-{HOST_TOLERANCE:.0%}")


TIME_TERMS = ("layer_fwd", "layer_bwd", "head_fwd", "head_bwd", "embed_fwd", "embed_bwd", "action_fwd", "action_bwd",
              "layer_elementwise_ms")


def under_load(prof: Profile, model: str, stages: int) -> tuple[Profile, float]:
    """``prof`` with every time term scaled to the wall time its layers take here while
    ``stages`` processes run them at once (the pipeline's condition)."""
    factor = statistics.median(launch_local(speed_ratio, stages, (model, prof, True), timeout_s=600))
    scaled = {name: LinearTerm({k: v * factor for k, v in term.coef.items()})
              for name in TIME_TERMS if (term := getattr(prof, name)) is not None}
    return dataclasses.replace(prof, **scaled), factor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="tiny", help="model preset with a committed CPU profile (tiny, small)")
    ap.add_argument("--longest", type=int, default=2048, help="the batch's longest sequence (tokens)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = preset(args.model)
    if args.stages > cfg.layers:
        raise SystemExit(f"--stages {args.stages} exceeds the {cfg.layers} layers of {args.model!r}")
    profile, provenance = profile_for_this_host(args.model, args.longest)
    profile, factor = under_load(profile, args.model, args.stages)
    print(f"profile: {provenance}; every time term x{factor:.2f}: the wall time of its layers here with "
          f"{args.stages} processes running them at once (profiles time a thread's CPU time)")
    link = measure_link(args.stages)
    print(f"link between stages MEASURED here (gloo ping-pong): {link.latency_s * 1e6:.0f} us latency, "
          f"{link.bandwidth_Bps / 1e9:.2f} GB/s")
    cost = CostModel(profile, cfg)
    lengths = skewed_lengths(args.seed, args.longest)
    g = torch.Generator().manual_seed(args.seed)
    batch = Batch(tuple(torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lengths))
    # A budget that the longest sequence does not fit whole without recompute: chunking matters.
    longest = cost.activation_bytes(ChunkShape((max(lengths),)), cfg.layers // args.stages)
    memory = cost.model_state_bytes(cfg.layers) + 0.75 * longest
    names, plans, sims = [], [], []
    for name in PLANNERS:
        try:
            plan = make_plan(name, PlanRequest(lengths, cost, args.stages, memory, link=link))
        except ValueError as exc:
            print(f"{name}: no plan ({exc})")
            continue
        more = in_orders(plan, cost, memory, link) if name == "epp" else {}
        for label, p in {name: plan, **more}.items():
            names.append(label)
            plans.append(p)
            sims.append(simulate(p, cost, memory, link))
    layers = plans[0].layers_per_stage
    if any(p.layers_per_stage != layers for p in plans):
        raise SystemExit("planners chose different layer splits; this benchmark needs one")
    print(f"model {args.model}, {args.stages} stages (layers {layers}), {len(lengths)} sequences, "
          f"{sum(lengths)} tokens, longest {max(lengths)}; memory budget {memory / 2**20:.1f} MiB/stage")
    measured = launch_local(run_plans, args.stages, (args.model, plans, batch, layers, args.steps), timeout_s=600)
    print("MEASURED: wall time on real processes, one thread each; SIMULATED with the profile above, "
          "one core per stage assumed")
    print(f"\n{'planner':12} {'chunks':>6} {'pipes':>5} {'MEASURED s':>10} {'simulated s':>11} "
          f"{'meas/sim':>8}  peak step MiB per stage (MEASURED / simulated)")
    for i, (name, plan, sim) in enumerate(zip(names, plans, sims)):
        per_step = [max(rank[i][k][0] for rank in measured) for k in range(args.steps)]
        t = statistics.median(per_step)
        mem = []
        for s in range(args.stages):
            act = measured[s][i][0][2]
            mem.append(f"{act / 2**20:.2f}/{sim.peak_step_bytes[s] / 2**20:.2f}")
        print(f"{name:12} {len(plan.chunks):>6} {len(plan.pipelines):>5} {t:>10.3f} {sim.iteration_time_s:>11.3f} "
              f"{t / sim.iteration_time_s:>8.2f}  {'  '.join(mem)}")
    rows = pack_rows(lengths, max(lengths))
    pad = 1 - sum(lengths) / (len(rows) * max(lengths))
    try:
        ref = launch_local(run_torch_1f1b, args.stages, (args.model, batch, layers, rows, args.steps), timeout_s=600)
    except RankFailed as exc:
        print(f"{'Schedule1F1B':12} reference run failed on rank {exc.rank}: "
              f"{exc.detail.strip().splitlines()[-1]}")
        return
    t_ref = statistics.median(max(r[k] for r in ref) for k in range(args.steps))
    print(f"{'Schedule1F1B':12} {len(rows):>6} {1:>5} {t_ref:>10.3f} {'-':>11} {'-':>8}  "
          f"(torch.distributed.pipelining, {len(rows)} padded rows of {max(lengths)} tokens, "
          f"padding {pad:.1%})")


if __name__ == "__main__":
    main()
