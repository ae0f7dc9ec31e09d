"""Planning time of the epp planner on one CPU core (measured, not simulated).

A 512-sequence GitHub-like global batch (128K longest) for an 8-stage pipeline; the paper's
target is under 2 s so planning hides behind one training iteration. Prints the CPU time
(``time.process_time``, the minimum over ``--repeat`` runs, so that other work on a shared
machine does not inflate it) and the wall time of each planner call, and where the K search
spent it.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from importlib import resources

os.environ.setdefault("OMP_NUM_THREADS", "1")

from infinipipe.contract.cost import MIXED_PRECISION_ADAM, CostModel, default_profile  # noqa: E402
from infinipipe.contract.model_config import preset  # noqa: E402
from infinipipe.data.lengths import sample_lengths  # noqa: E402
from infinipipe.planners.registry import make_plan  # noqa: E402
from infinipipe.planners.request import PlanRequest  # noqa: E402
from infinipipe.profiling.fit import profile_from_measurements  # noqa: E402


def cost_model(model: str) -> tuple[CostModel, str]:
    try:
        return CostModel(default_profile(model), preset(model), MIXED_PRECISION_ADAM), f"committed profile for {model}"
    except ValueError:
        path = resources.files("infinipipe") / "profiles" / "measurements" / "h100-layer-costs.json"
        data = json.loads(path.read_text())
        profile = profile_from_measurements(data, model, preset(model), "h100-layer-costs.json")
        return CostModel(profile, preset(model), MIXED_PRECISION_ADAM), "fitted from h100-layer-costs.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--max-len", type=int, default=128 * 1024)
    ap.add_argument("--stages", type=int, default=8)
    ap.add_argument("--memory-gib", type=float, default=80.0)
    ap.add_argument("--planners", default="epp,epp-no-ckpt,epp-full-ckpt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="report the minimum over this many runs")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    cost, source = cost_model(args.model)
    lengths = sample_lengths("github", args.batch, args.max_len, seed=args.seed)
    request = PlanRequest(lengths, cost, args.stages, args.memory_gib * 2**30)
    print(f"{args.model}, {args.stages} stages, {args.memory_gib:g} GiB, {args.batch} GitHub-like sequences "
          f"(longest {max(lengths)}), cost model: {source}; times are measured on one core, "
          f"minimum of {args.repeat} runs")
    for name in args.planners.split(","):
        cpu, wall = [], []
        try:
            for _ in range(max(args.repeat, 1)):
                start, start_cpu = time.perf_counter(), time.process_time()
                plan = make_plan(name, request)
                cpu.append(time.process_time() - start_cpu)
                wall.append(time.perf_counter() - start)
        except ValueError as exc:
            print(f"{name:14s} failed: {exc}")
            continue
        meta = plan.metadata
        trials = meta.get("search", [])
        print(f"{name:14s} planning {min(cpu):5.2f} s CPU ({min(wall):5.2f} s wall)  chosen={meta.get('chosen')}  "
              f"chunks={len(plan.chunks)}  "
              f"pipelines={len(plan.pipelines)}  simulated iteration {meta.get('iteration_time_s', float('nan')):.2f} s  "
              f"fits={meta.get('feasible')}  trials={len(trials)}")
        for t in trials:
            print(f"    {t['candidate']:<28} {'screen' if t['screened'] else 'full  '} {t['planning_s']:6.3f} s  "
                  f"iteration {t.get('iteration_time_s', float('nan')):7.2f} s  pipelines={t.get('num_pipelines')}")

if __name__ == "__main__":
    main()
