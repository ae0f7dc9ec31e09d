"""Planning time of the epp planner against the step it hides behind (MEASURED wall time of the
planner on this machine; step and plan times SIMULATED on the committed profiles).

For each case (a global batch of 512 GitHub-like sequences), the table gives the unbounded
search (no deadline: the plan that depends on its inputs alone) and the search as a run plans
it, with the default deadline (`PlannerOptions.behind_a_step`: a tenth of the step), in the
planning process alone and with a pool, each cold and warm-started from the winner of the
previous batch of the same corpus (what training passes from step to step). "share" is the
planning wall time over the simulated step; "vs unbounded" the plan's simulated iteration time
over the unbounded search's. Planning time depends on the machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from importlib import resources

os.environ.setdefault("OMP_NUM_THREADS", "1")

from infinipipe.contract.cost import MIXED_PRECISION_ADAM, CostModel, default_profile  # noqa: E402
from infinipipe.contract.model_config import preset  # noqa: E402
from infinipipe.data.lengths import sample_lengths  # noqa: E402
from infinipipe.planners.candidates import WarmStart  # noqa: E402
from infinipipe.planners.options import PlannerOptions  # noqa: E402
from infinipipe.planners.registry import make_plan  # noqa: E402
from infinipipe.planners.request import PlanRequest  # noqa: E402
from infinipipe.planners.search_pool import AUTO, resolve_pool_size, usable_cores  # noqa: E402
from infinipipe.profiling.fit import profile_from_measurements  # noqa: E402

# name: (model, stages, context, memory GiB, seed, sequences at the cap)
CASES = {
    "7b-8-128k": ("llama-7b", 8, 128 * 1024, 80, 0, 0),
    "13b-8-96k-cap": ("llama-13b", 8, 96 * 1024, 80, 2, 4),
    "30b-16-128k": ("llama-30b", 16, 128 * 1024, 80, 0, 0),
}
PREVIOUS_SEED = 1000  # the warm start's batch: another draw of the same corpus


def cost_model(model: str) -> tuple[CostModel, str]:
    try:
        return CostModel(default_profile(model), preset(model), MIXED_PRECISION_ADAM), f"committed profile for {model}"
    except ValueError:
        path = resources.files("infinipipe") / "profiles" / "measurements" / "h100-layer-costs.json"
        data = json.loads(path.read_text())
        profile = profile_from_measurements(data, model, preset(model), "h100-layer-costs.json")
        return CostModel(profile, preset(model), MIXED_PRECISION_ADAM), "fitted from h100-layer-costs.json"


def timed(request: PlanRequest) -> tuple[float, dict]:
    start = time.perf_counter()
    plan = make_plan("epp", request)
    return time.perf_counter() - start, plan.metadata


def run_case(name: str, pools: list[int], show_trials: bool) -> list[dict]:
    model, stages, context, gib, seed, at_cap = CASES[name]
    cost, source = cost_model(model)
    lengths = sample_lengths("github", 512, context, seed=seed, at_cap=at_cap)
    previous = sample_lengths("github", 512, context, seed=seed + PREVIOUS_SEED, at_cap=at_cap)
    base = PlanRequest(lengths, cost, stages, gib * 2**30)
    wall, meta = timed(base)
    step = meta["iteration_time_s"]
    print(f"\n{name}: {model}, {stages} stages, {gib} GiB, longest {max(lengths)}, {sum(n == context for n in lengths)} "
          f"at the cap ({source}); unbounded search: {wall:.2f}s wall, plan {step:.2f}s SIMULATED "
          f"({meta['chosen']}, {len(meta['search'])} trials)")
    rows = [{"case": name, "search": "unbounded, no pool", "warm": False, "wall_s": wall, "step_s": step,
             "plan_s": step, "skipped": 0}]
    for pool in pools:
        options = PlannerOptions.behind_a_step({"pool_size": pool})
        hint = WarmStart.from_plan_metadata(timed(dataclasses.replace(base, lengths=previous, options=options))[1])
        for warm in (None, hint):
            wall, got = timed(dataclasses.replace(base, options=options, warm=warm))
            rows.append({"case": name, "search": f"deadline {options.deadline_share:g} of the step, "
                                                 f"{pool or 'no'} pool processes",
                         "warm": warm is not None, "wall_s": wall, "step_s": step, "plan_s": got["iteration_time_s"],
                         "skipped": len(got["skipped_for_time"]), "deadline_s": got["deadline_s"]})
            if show_trials:
                for t in got["search"]:
                    print(f"    {t['candidate']:<30} {'screen' if t['screened'] else 'full  '} {t['planning_s']:7.3f}s "
                          f"{t.get('iteration_time_s', float('nan')):8.2f}s")
    for r in rows:
        print(f"  {r['search']:<46} {'warm' if r['warm'] else 'cold':<5} planning {r['wall_s']:6.2f}s MEASURED "
              f"= {r['wall_s'] / r['step_s']:6.1%} of the step; plan {r['plan_s']:7.2f}s SIMULATED "
              f"= {r['plan_s'] / step:.4f}x unbounded; {r['skipped']} skipped for time")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--pools", default=str(AUTO),
                    help="pool sizes to time, comma-separated (-1: the default, the cores a run on this machine "
                         "with no training ranks would use; 0: the planning process alone)")
    ap.add_argument("--trials", action="store_true", help="print every trial of the bounded searches")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON at the end")
    args = ap.parse_args()
    pools = sorted({resolve_pool_size(int(p)) for p in args.pools.split(",")} | {0})
    print(f"planning time: {usable_cores()} usable cores here; pools timed: {pools} "
          f"(-1 resolves to {resolve_pool_size(AUTO)} here)")
    rows = [r for name in args.cases.split(",") for r in run_case(name, pools, args.trials)]
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
