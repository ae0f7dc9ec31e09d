"""SIMULATED: EPP on cap-heavy batches (corpora truncated at the context length).

Each case samples a GitHub-like batch with at least ``--at-cap`` sequences exactly at the context
length, then reports, per model, pipeline depth, context length and memory budget:
- the memory lower bound (`planners/bound.py`): a budget under it has no plan at all;
- EPP's simulated iteration time and its ratio to the compute floor (the busiest stage's forward
  and backward of every token, no bubble, no recompute), and its planning time (measured here);
- the grouping a user would try by hand: each capped sequence planned alone and the rest as one
  batch, each by EPP at the same budget, the pipelines run back to back;
- every baseline planner that fits.
It then lists every case where EPP found no plan although the bound allows one, or was slower
than the hand grouping or a fitting baseline. Nothing runs on a GPU: times are the cost model's
predictions on the committed H100 profiles.

EPP plans with the host tier (``--host-gib``, default 128; 0 plans as without it) on the profiles'
host link (``--host-bandwidth 0.5`` halves it); the baselines keep everything on the device.

Usage: ``python benchmarks/cap_heavy.py [--models llama-13b] [--stages 8] [--jobs 2] [--json out.json]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from infinipipe.contract.cost import CostModel, default_profile_name, load_profile
from infinipipe.contract.model_config import preset
from infinipipe.data.lengths import sample_lengths
from infinipipe.planners.bound import memory_lower_bound
from infinipipe.planners.compare import BASELINES, compare_planners, compute_floor_s
from infinipipe.planners.epp import NoPlanError, plan_in_parts
from infinipipe.planners.request import PlanRequest
from infinipipe.sim.simulator import simulate

GiB = 2**30


def run_case(case: tuple) -> dict:
    model, stages, max_len, memory_gib, batch, at_cap, seed, host_gib, bandwidth = case
    profile = load_profile(default_profile_name(model))
    if profile.host_link is not None:
        profile = dataclasses.replace(profile, host_link=profile.host_link.scaled(bandwidth))
    cost = CostModel(profile, preset(model))
    lengths = sample_lengths("github", batch, max_len, seed=seed, at_cap=at_cap)
    budget, host = memory_gib * GiB, host_gib * GiB
    request = PlanRequest(lengths, cost, stages, budget, host_memory_budget=host)
    bound = memory_lower_bound(request.with_host_tier().cost, request.layers, lengths)
    out = {"model": model, "stages": stages, "max_len": max_len, "memory_gib": memory_gib, "batch": batch,
           "at_cap": lengths.count(max_len), "simulated": True, "lower_bound_gib": bound.bytes / GiB,
           "floor_s": compute_floor_s(cost, lengths, stages), "host_gib": host_gib, "bandwidth": bandwidth}
    if bound.bytes > budget:
        return out
    out["planners"] = compare_planners(cost, lengths, stages, budget, ["epp", *BASELINES], host_memory_budget=host)
    started = time.perf_counter()
    capped = [i for i, n in enumerate(lengths) if n == max_len]
    rest = [i for i, n in enumerate(lengths) if n < max_len]
    try:
        plan = plan_in_parts(request, [[i] for i in capped] + ([rest] if rest else []))
        sim = simulate(plan, cost, budget)
        out["by_hand"] = {"planned": True, "feasible": sim.feasible, "iteration_time_s": sim.iteration_time_s,
                          "planning_s": time.perf_counter() - started}
    except NoPlanError as exc:
        out["by_hand"] = {"planned": False, "feasible": False, "error": str(exc)}
    return out


def cell(t: float | None, floor: float) -> str:
    return f"{t:>7.2f}s {t / floor:>5.2f}x" if t is not None else f"{'none':>8} {'':>6}"


def time_of(row: dict) -> float | None:
    return row["iteration_time_s"] if row.get("planned") and row.get("feasible") else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama-7b", "llama-13b", "llama-30b"])
    parser.add_argument("--stages", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--max-len", nargs="+", type=int, default=[65536, 98304, 131072])
    parser.add_argument("--memory-gib", nargs="+", type=float, default=[64.0, 80.0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--at-cap", type=int, default=4, help="sequences at least at the context length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host-gib", type=float, default=128.0,
                        help="host memory per device for EPP's host tier (0: off, the plans as without it)")
    parser.add_argument("--host-bandwidth", type=float, default=1.0,
                        help="the profiles' host-link bandwidth times this (0.5: what a plan must survive)")
    parser.add_argument("--jobs", type=int, default=1, help="cases planned in parallel processes")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args()

    cases = [(m, s, n, g, args.batch, args.at_cap, args.seed, args.host_gib, args.host_bandwidth) for s, n, g, m in
             itertools.product(args.stages, args.max_len, args.memory_gib, args.models)]
    print("SIMULATED iteration times (event-driven simulator on the committed H100 profiles; no GPU was run); "
          "planning times measured on this machine")
    print(f"{len(cases)} cases, batch {args.batch}, at least {args.at_cap} sequences at the context length; "
          "'/floor' = time over the compute floor; 'by hand' = each capped sequence its own pipeline, the rest one batch")
    print(f"host tier: {args.host_gib:g} GiB per device at {args.host_bandwidth:g}x the profiles' host-link bandwidth; "
          "'offload' = bytes EPP's plan copies to the host over all stages, 'wait' = copy time its worst stage waits")
    print(f"{'case':<26} {'bound':>8} {'epp':>8} {'/floor':>6} {'plan s':>6} {'offload':>9} {'wait':>5} "
          f"{'by hand':>8} {'/floor':>6}  " + "  ".join(f"{b:>16}" for b in BASELINES))
    records, ratios, hand_ratios, problems = [], [], [], []
    with ProcessPoolExecutor(args.jobs) as pool:
        for rec in pool.map(run_case, cases):
            records.append(rec)
            name = f"{rec['model']} pp{rec['stages']} {rec['max_len'] // 1024}K {rec['memory_gib']:g}G"
            if "planners" not in rec:
                print(f"{name:<26} {rec['lower_bound_gib']:>6.1f}G  no plan can fit: the lower bound exceeds the budget")
                continue
            rows, floor = rec["planners"], rec["floor_s"]
            epp, hand = time_of(rows["epp"]), time_of(rec["by_hand"])
            cells = []
            for b in BASELINES:
                t = time_of(rows[b])
                cells.append(("OOM" if rows[b]["planned"] else "-") if t is None else f"{t:.2f}s")
                if t is not None and (epp is None or epp > t * (1 + 1e-9)):
                    problems.append(f"{name}: epp {epp} slower than {b} {t:.2f}s")
            if epp is None:
                problems.append(f"{name}: epp found no plan under a budget the lower bound allows: "
                                f"{rows['epp'].get('error', '')[:300]}")
            else:
                ratios.append(epp / floor)
            if hand is not None:
                hand_ratios.append(hand / floor)
                if epp is None or epp > hand * (1 + 1e-9):
                    problems.append(f"{name}: epp {epp} slower than the hand grouping {hand:.2f}s")
            plan_s = f"{rows['epp']['planning_s']:>6.1f}" if rows["epp"]["planned"] else f"{'':>6}"
            moved = sum(rows["epp"].get("offloaded_bytes") or [0.0]) / GiB
            wait = max(rows["epp"].get("exposed_copy_s") or [0.0])
            print(f"{name:<26} {rec['lower_bound_gib']:>6.1f}G  {cell(epp, floor)} {plan_s} {moved:>7.0f}G "
                  f"{wait:>4.2f}s {cell(hand, floor)}  " + "  ".join(f"{c:>16}" for c in cells))
            sys.stdout.flush()
    if ratios:
        print(f"\nepp over the compute floor: median {statistics.median(ratios):.2f}x, max {max(ratios):.2f}x "
              f"({len(ratios)} cases)")
    if hand_ratios:
        print(f"hand grouping over the floor: median {statistics.median(hand_ratios):.2f}x ({len(hand_ratios)} cases)")
    print(f"\ncases where epp has no plan although the bound allows one, or is slower than the hand grouping or a "
          f"fitting baseline: {len(problems)}")
    for p in problems:
        print("  " + p)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1, default=str)


if __name__ == "__main__":
    main()
