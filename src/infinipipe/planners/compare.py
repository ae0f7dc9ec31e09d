"""Every planner on the same batch, costed by the same simulator: the comparison benchmarks print."""
from __future__ import annotations

import time
from collections.abc import Sequence

from ..contract.cost import CostModel
from ..contract.shapes import ChunkShape
from ..contract.units import GIB
from ..sim.simulator import simulate
from .options import PlannerOptions
from .registry import SP_PLANNERS, make_plan
from .request import PlanRequest
from .stage_layers import balance_layers

BASELINES = ("seq1f1b", "seq1f1b-balanced", "batch-1f1b", "gpipe", "epp-uniform")
ABLATIONS = ("epp-no-ckpt", "epp-full-ckpt")


UNLIMITED = float(2**60)  # bytes: a device budget no plan reaches
NO_HOST_TIER = "epp (no host tier)"
UNLIMITED_MEMORY = "epp (unlimited memory)"


def compare_planners(cost: CostModel, lengths: Sequence[int], stages: int, memory_budget: float,
                     planners: Sequence[str], options: PlannerOptions | None = None,
                     host_memory_budget: float = 0.0) -> dict[str, dict]:
    """Simulated figures of each planner's plan (``planned: False`` with the reason if none fits),
    every one asked with ``host_memory_budget`` (only EPP offloads). Where the host tier is on,
    EPP also runs without it (`NO_HOST_TIER`); `UNLIMITED_MEMORY` is EPP where no device budget
    binds, what memory still costs: both run when named in ``planners``."""
    rows = {}
    for name in planners:
        planner, budget, host = name, memory_budget, host_memory_budget
        if name == NO_HOST_TIER:
            planner, host = "epp", 0.0
        elif name == UNLIMITED_MEMORY:
            planner, budget, host = "epp", UNLIMITED, 0.0
        started = time.perf_counter()
        try:
            plan = make_plan(planner, PlanRequest(lengths, cost, stages, budget, options=options or PlannerOptions(),
                                                  host_memory_budget=host))
        except ValueError as exc:
            rows[name] = {"planned": False, "error": str(exc), "feasible": False}
            continue
        planning_s = time.perf_counter() - started
        search = {k: plan.metadata[k] for k in ("deadline_s", "skipped_for_time", "pool_size") if k in plan.metadata}
        rows[name] = {**simulate(plan, cost, budget).to_json(), "planned": True, "planning_s": planning_s,
                      **search}
    return rows


def compare_sp_baselines(cost: CostModel, lengths: Sequence[int], gpus: int, memory_budget: float,
                         options: PlannerOptions | None = None) -> dict[str, dict]:
    """The SP baselines (no pipeline) on ``gpus`` GPUs, the same batch and simulator, as rows
    like `compare_planners`' (``bubble_ratio`` is the GPU time idle groups leave)."""
    rows = {}
    for name, planner in SP_PLANNERS.items():
        started = time.perf_counter()
        try:
            plan = planner(cost, lengths, gpus, memory_budget, options or PlannerOptions())
        except ValueError as exc:
            rows[name] = {"planned": False, "error": str(exc), "feasible": False}
            continue
        rows[name] = {**plan.to_json(), "planned": True, "planning_s": time.perf_counter() - started}
    return rows


def describe_sp_rows(rows: dict[str, dict], gpus: int) -> str:
    """What the SP rows ran: no pipeline, their groups, on the pipelines' GPUs."""
    groups = {name: "+".join(str(g["sp"]) for g in rows[name]["groups"]) if rows.get(name, {}).get("planned")
              else "none" for name in SP_PLANNERS}
    return (f"  ulysses and flexsp: no pipeline, the same {gpus} GPUs (stages x sp) on the same batch, model "
            f"states sharded over all of them; SP groups: ulysses {groups['ulysses']}, flexsp {groups['flexsp']} "
            "(the floor below bounds pipelines on these stages, not these)")


def compute_floor_s(cost: CostModel, lengths: Sequence[int], stages: int) -> float:
    """No plan of this batch on the cost-balanced layer split (every planner's default) is
    faster: its busiest stage runs every sequence's forward and backward as one chunk (splitting
    only adds per-chunk overhead and prefix reads), with no bubble and no recompute."""
    whole = ChunkShape(tuple(lengths))
    layers = balance_layers(cost, stages)
    last = len(layers) - 1
    return max(cost.forward_ms(whole, n, s == 0, s == last) + cost.backward_ms(whole, n, s == 0, s == last)
               for s, n in enumerate(layers)) / 1e3


def format_rows(rows: dict[str, dict], reference: str = "epp") -> list[str]:
    """One line per planner: time, bubbles, peak memory, OOM, and ``reference``'s speedup over it."""
    ref = rows.get(reference)
    ok = bool(ref and ref["planned"] and ref["feasible"])
    width = max([16, *(len(name) for name in rows)])
    lines = [f"  {'planner':<{width}} {'iteration':>10}  {'bubble':>7}  {'peak mem':>9}  {'host':>8}  {'OOM':>3}  "
             f"{reference + ' speedup':>12}  {'planning':>8}"]
    for name, row in rows.items():
        if not row["planned"]:
            lines.append(f"  {name:<{width}} {'no plan fits':>10}")
            continue
        speedup = ""
        if name != reference and ok:
            speedup = f"{row['iteration_time_s'] / ref['iteration_time_s']:.2f}x" if row["feasible"] else "(OOM)"
        host = max(row.get("peak_host_bytes") or [0.0])
        lines.append(f"  {name:<{width}} {row['iteration_time_s']:>9.2f}s  {row['bubble_ratio']:>6.1%}  "
                     f"{max(row['peak_memory_bytes']) / GIB:>6.1f}GiB  "
                     f"{(f'{host / GIB:.1f}GiB' if host else '-'):>8}  {'' if row['feasible'] else 'OOM':>3}  "
                     f"{speedup:>12}  {row['planning_s']:>7.2f}s")
    return lines


def bubble_line(name: str, row: dict) -> str:
    """A plan's bubble split into the stages' imbalance (idle no order removes: the busiest stage
    holds more work) and the schedule's share (the busiest stage's own idle)."""
    total, schedule = row["bubble_ratio"], row["schedule_bubble_ratio"]
    busy = row["busy_s"]
    busiest = max(range(len(busy)), key=busy.__getitem__)
    return (f"  {name} bubble {total:.1%}: {total - schedule:.1%} stage imbalance (stage {busiest} is busy "
            f"{busy[busiest] - min(busy):.2f}s longer than the least busy stage: layers, embedding, LM head or recompute), "
            f"{schedule:.1%} the schedule's (the busiest stage's idle)")


def host_tier_line(row: dict) -> str:
    """What a plan's host tier did: bytes copied out per stage, copy time a stage waited, host peak."""
    moved = row.get("offloaded_bytes") or []
    if not moved:
        return "  host tier: off"
    exposed = max(row.get("exposed_copy_s") or [0.0])
    return (f"  host tier: {sum(moved) / GIB:,.0f} GiB offloaded ({max(moved) / GIB:,.0f} GiB on the busiest stage), "
            f"host peak {max(row['peak_host_bytes']) / GIB:.1f} GiB per device, "
            f"{exposed:.2f} s waited for copies on the worst stage")
