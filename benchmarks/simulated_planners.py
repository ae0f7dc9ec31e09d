"""SIMULATED grid: EPP against every baseline planner on the committed H100 profiles.

For each model, pipeline depth, context length, length distribution and memory budget, every
planner plans the same sampled global batch and the event-driven simulator costs each plan with
the committed GPU profile of that model. Per case it prints EPP's iteration time and its speedup
over each baseline (``OOM`` where a baseline's plan does not fit, ``-`` where it found none),
then the median speedup over each baseline and every case where EPP did not fit although the
memory lower bound allows a plan, or was slower than a baseline that fit. A case whose lower bound
exceeds its budget is not planned: no plan can fit it. Nothing runs on a GPU: the figures are the cost model's predictions.

Usage: ``python benchmarks/simulated_planners.py [--models llama-7b ...] [--jobs 2] [--json out.json]``;
``--feasibility`` only sorts the cases into those no plan can fit (the lower bound), those EPP
plans (at or above the frugal plan's peak, or planned where between), and any left.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor

from infinipipe.contract.cost import CostModel, default_profile_name, load_profile
from infinipipe.contract.model_config import preset
from infinipipe.data.lengths import sample_lengths
from infinipipe.planners.bound import memory_lower_bound
from infinipipe.planners.compare import BASELINES, compare_planners
from infinipipe.planners.epp import NoPlanError, frugal_plan
from infinipipe.planners.registry import make_plan
from infinipipe.planners.request import PlanRequest
from infinipipe.planners.stage_layers import balance_layers
from infinipipe.sim.simulator import simulate

SEQ1F1B = ("seq1f1b", "seq1f1b-balanced")


def run_case(case: tuple) -> dict:
    model, stages, max_len, dist, memory_gib, batch, seed, at_cap = case
    cost = CostModel(load_profile(default_profile_name(model)), preset(model))
    lengths = sample_lengths(dist, batch, max_len, seed=seed, at_cap=at_cap)
    bound = memory_lower_bound(cost, balance_layers(cost, stages), lengths)
    out = {"model": model, "stages": stages, "max_len": max_len, "dist": dist, "memory_gib": memory_gib,
           "batch": batch, "tokens": sum(lengths), "simulated": True, "lower_bound_gib": bound.bytes / 2**30}
    if bound.bytes > memory_gib * 2**30:  # no planner can fit: nothing to plan
        return {**out, "planners": {}}
    return {**out, "planners": compare_planners(cost, lengths, stages, memory_gib * 2**30, ["epp", *BASELINES])}


def feasibility(case: tuple) -> dict:
    """Whether a case has a plan, without the full comparison: under the lower bound none can
    fit; at or above the frugal plan's peak EPP plans (its search tries that plan where nothing
    else fits); between the two, EPP is run to see."""
    model, stages, max_len, dist, memory_gib, batch, seed, at_cap = case
    cost = CostModel(load_profile(default_profile_name(model)), preset(model))
    lengths = sample_lengths(dist, batch, max_len, seed=seed, at_cap=at_cap)
    request = PlanRequest(lengths, cost, stages, memory_gib * 2**30)
    bound = memory_lower_bound(cost, request.layers, lengths).bytes
    frugal = max(simulate(frugal_plan(request), cost).peak_memory_bytes)
    out = {"case": case, "bound_gib": bound / 2**30, "frugal_gib": frugal / 2**30}
    if bound <= request.memory_budget < frugal:
        try:
            out["epp_s"] = simulate(make_plan("epp", request), cost).iteration_time_s
        except NoPlanError:
            out["epp_s"] = None
    return out


def print_feasibility(cases: list[tuple], jobs: int) -> None:
    print("lower bound and frugal plan per case (SIMULATED peaks; EPP run only between the two)")
    counts = {"no plan can fit (budget under the lower bound)": 0, "epp plans (budget at or above the frugal peak)": 0,
              "epp plans (between bound and frugal peak)": 0, "epp finds no plan although the bound allows one": 0}
    with ProcessPoolExecutor(jobs) as pool:
        for rec in pool.map(feasibility, cases):
            model, stages, max_len, dist, memory_gib = rec["case"][:5]
            name = f"{model} pp{stages} {max_len // 1024}K {dist} {memory_gib:g}G"
            if rec["bound_gib"] > memory_gib:
                verdict = "no plan can fit (budget under the lower bound)"
            elif rec["frugal_gib"] <= memory_gib:
                verdict = "epp plans (budget at or above the frugal peak)"
            elif rec.get("epp_s") is not None:
                verdict = "epp plans (between bound and frugal peak)"
            else:
                verdict = "epp finds no plan although the bound allows one"
            counts[verdict] += 1
            print(f"{name:<36} bound {rec['bound_gib']:6.1f} GiB  frugal {rec['frugal_gib']:6.1f} GiB  {verdict}")
            sys.stdout.flush()
    for verdict, n in counts.items():
        print(f"  {n:4d} cases: {verdict}")


def time_of(row: dict) -> float | None:
    return row["iteration_time_s"] if row["planned"] and row["feasible"] else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama-7b", "llama-13b", "llama-30b"])
    parser.add_argument("--stages", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--max-len", nargs="+", type=int, default=[32768, 65536, 98304, 131072])
    parser.add_argument("--dists", nargs="+", default=["github", "commoncrawl", "python-stdlib"])
    parser.add_argument("--memory-gib", nargs="+", type=float, default=[64.0, 80.0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--at-cap", type=int, default=0, help="at least this many sequences at the context length")
    parser.add_argument("--jobs", type=int, default=1, help="cases planned in parallel processes")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    parser.add_argument("--feasibility", action="store_true",
                        help="only say which cases have a plan (lower bound, frugal plan, EPP between the two)")
    args = parser.parse_args()

    # Models vary fastest, so a run cut short has covered every model at the depths it reached.
    cases = [(m, s, n, d, g, args.batch, args.seed, args.at_cap) for s, n, d, g, m in
             itertools.product(args.stages, args.max_len, args.dists, args.memory_gib, args.models)
             if s <= preset(m).layers]
    if args.feasibility:
        print_feasibility(cases, args.jobs)
        return
    print("SIMULATED iteration times (event-driven simulator on the committed H100 profiles; no GPU was run)")
    print(f"{len(cases)} cases, batch {args.batch}; speedup = baseline time / EPP time; "
          "'best seq1f1b' is the faster of seq1f1b and seq1f1b-balanced")
    header = f"{'case':<36} {'epp':>8}  " + "  ".join(f"{b:>16}" for b in (*BASELINES, "best seq1f1b"))
    print(header)
    records, speedups, problems = [], {b: [] for b in (*BASELINES, "best seq1f1b")}, []
    with ProcessPoolExecutor(args.jobs) as pool:
        for rec in pool.map(run_case, cases):
            rows = rec["planners"]
            name = (f"{rec['model']} pp{rec['stages']} {rec['max_len'] // 1024}K {rec['dist']} "
                    f"{rec['memory_gib']:g}G")
            if not rows:
                print(f"{name:<36} no plan can fit: any plan needs {rec['lower_bound_gib']:.1f} GiB (the lower bound)")
                continue
            times = {p: time_of(r) for p, r in rows.items()}
            times["best seq1f1b"] = min((times[p] for p in SEQ1F1B if times[p] is not None), default=None)
            if times["epp"] is None:
                problems.append(f"{name}: epp found no plan although the lower bound "
                                f"({rec['lower_bound_gib']:.1f} GiB) allows one")
            if all(t is None for t in times.values()):
                print(f"{name:<36} no planner fits under a budget the lower bound allows")
                continue
            records.append(rec)
            epp = times["epp"]
            cells = []
            for b in (*BASELINES, "best seq1f1b"):
                if times[b] is None:
                    row = rows.get(b, {"planned": False})
                    cells.append("OOM" if row.get("planned") else "-")
                elif epp is None:
                    cells.append("epp none")
                else:
                    speedups[b].append(times[b] / epp)
                    cells.append(f"{times[b] / epp:.2f}x")
                    if epp > times[b] * (1 + 1e-9):
                        problems.append(f"{name}: epp {epp:.2f}s slower than {b} {times[b]:.2f}s")
            print(f"{name:<36} {epp if epp is not None else float('nan'):>7.2f}s  "
                  + "  ".join(f"{c:>16}" for c in cells))
            sys.stdout.flush()
    print("\nmedian EPP speedup over each baseline (cases where both fit):")
    for b, values in speedups.items():
        if values:
            print(f"  {b:<16} median {statistics.median(values):.2f}x  min {min(values):.2f}x  "
                  f"max {max(values):.2f}x  ({len(values)} cases)")
    print(f"\nEPP infeasible where the lower bound allows a plan, or slower than a fitting baseline: {len(problems)} case(s)")
    for p in problems:
        print("  " + p)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
