"""SIMULATED comparison of EPP with the baseline planners on the committed H100 profiles.

For each model, pipeline depth, context length, length distribution and global batch, every
planner plans the same sampled batch and the event-driven simulator costs the plan with the
committed GPU profile of that model: iteration time, bubble ratio, peak memory per device,
whether it runs out of memory, and EPP's speedup over each baseline. Nothing here runs on a GPU:
the figures are predictions of the cost model, and the table says so.

Usage: ``python benchmarks/simulated_planners.py [--models llama-7b ...] [--json out.json]``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

from infinipipe.contract.cost import CostModel, default_profile_name, load_profile
from infinipipe.contract.model_config import preset
from infinipipe.data.lengths import sample_lengths
from infinipipe.planners.compare import ABLATIONS, BASELINES, compare_planners, format_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama-7b", "llama-13b"])
    parser.add_argument("--stages", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--max-len", nargs="+", type=int, default=[65536, 131072])
    parser.add_argument("--dists", nargs="+", default=["github", "commoncrawl"])
    parser.add_argument("--batches", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--memory-gib", type=float, default=80.0, help="memory per device (default 80)")
    parser.add_argument("--no-ablations", action="store_true", help="skip epp-no-ckpt and epp-full-ckpt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args()

    memory = args.memory_gib * 2**30
    planners = ["epp", *BASELINES, *(() if args.no_ablations else ABLATIONS)]
    print("SIMULATED iteration times (event-driven simulator on fitted cost models; no GPU was run)")
    print(f"memory per device {args.memory_gib:g} GiB; P2P link 200 Gbit/s, 10 us; speedup = baseline time / EPP time")
    records = []
    for model_name in args.models:
        profile_name = default_profile_name(model_name)
        profile = load_profile(profile_name)
        cost = CostModel(profile, preset(model_name))
        origin = f"derived from {profile.derived_from}" if profile.derived_from else "measured"
        print(f"\n=== {model_name}: profile {profile_name} ({profile.device}, {profile.dtype}, {origin}) ===")
        for stages, max_len, dist, batch in itertools.product(args.stages, args.max_len, args.dists, args.batches):
            lengths = sample_lengths(dist, batch, max_len, seed=args.seed)
            rows = compare_planners(cost, lengths, stages, memory, planners)
            print(f"\n{model_name}, {stages} stages, max {max_len // 1024}K, {dist}, batch {batch} "
                  f"({sum(lengths)} tokens, longest {max(lengths)})")
            print("\n".join(format_rows(rows)))
            sys.stdout.flush()
            records.append({"model": model_name, "profile": profile_name, "stages": stages, "max_len": max_len,
                            "dist": dist, "batch": batch, "memory_budget": memory, "simulated": True,
                            "planners": rows})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
