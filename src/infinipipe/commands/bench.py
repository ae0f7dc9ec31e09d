"""``infinipipe bench``: every planner on one sampled batch, SIMULATED on a committed profile."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="compare EPP with the baselines in simulation on one batch")
    p.add_argument("--model", default="llama-13b", help="model preset (default llama-13b)")
    p.add_argument("--profile", help="profile name or file (default: the committed one of --model)")
    p.add_argument("--stages", type=int, default=8)
    p.add_argument("--dist", default="github", help="length distribution (github, commoncrawl, python-stdlib)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--max-len", type=int, default=98304)
    p.add_argument("--memory-budget", default="80GiB", help="memory budget per device (default 80GiB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ablations", action="store_true", help="also run epp-no-ckpt and epp-full-ckpt")
    p.add_argument("--json", action="store_true", help="print every figure as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..contract.cost import CostModel, default_profile_name, load_profile
    from ..contract.model_config import preset
    from ..contract.units import parse_bytes
    from ..data.lengths import sample_lengths
    from ..planners.compare import ABLATIONS, BASELINES, compare_planners, format_rows

    name = args.profile or default_profile_name(args.model)
    profile = load_profile(name)
    cost = CostModel(profile, preset(args.model))
    lengths = sample_lengths(args.dist, args.batch, args.max_len, args.seed)
    planners = ["epp", *BASELINES, *(ABLATIONS if args.ablations else ())]
    rows = compare_planners(cost, lengths, args.stages, parse_bytes(args.memory_budget, "--memory-budget"), planners)
    if args.json:
        print(json.dumps({"simulated": True, "profile": name, "rows": rows}, indent=1, default=str))
        return 0
    origin = f"derived from {profile.derived_from}" if profile.derived_from else profile.source.split(";")[0]
    print(f"SIMULATED (no hardware was run): {args.model} on {args.stages} stages, {args.memory_budget} per device, "
          f"{args.batch} {args.dist} sequences up to {args.max_len} tokens ({sum(lengths):,} tokens)")
    print(f"profile {name}: {profile.device}, {profile.dtype}, {origin}")
    print("\n".join(format_rows(rows)))
    return 0
