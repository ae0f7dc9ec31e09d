"""``infinipipe bench``: every planner on one sampled batch, SIMULATED on a committed profile.

Each planner plans the same batch and the simulator costs every plan with the same profile, so
the table compares planners, not machines; no hardware runs.
"""
from __future__ import annotations

import argparse
import json

from .plan import HOST_DEFAULT, OPTION_HELP, add_host_option, add_layout_options, add_model_options

BENCH_MODEL = "llama-13b"


def register(sub: argparse._SubParsersAction) -> None:
    from ..data.lengths import DISTRIBUTIONS

    p = sub.add_parser("bench", help="compare EPP with the baselines in simulation on one batch",
                       description=__doc__)
    add_model_options(p, f"default {BENCH_MODEL}")
    p.add_argument("--stages", type=int, default=8, help="pipeline stages (default 8)")
    add_layout_options(p, "defaults in brackets")
    p.add_argument("--dist", default="github", choices=DISTRIBUTIONS,
                   help="length distribution to sample the batch from (default github)")
    p.add_argument("--batch", type=int, default=512, help="sequences in the batch (default 512)")
    p.add_argument("--max-len", type=int, default=98304,
                   help="context length: sampled lengths are truncated to it (default 98304)")
    p.add_argument("--memory-budget", default="80GiB", help="memory budget per device (default 80GiB)")
    add_host_option(p, HOST_DEFAULT)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--at-cap", type=int, default=0, metavar="N",
                   help="at least N sequences at the context length, as in a corpus truncated there (default 0)")
    p.add_argument("--ablations", action="store_true", help="also run epp-no-ckpt and epp-full-ckpt")
    p.add_argument("--sp-baselines", action="store_true",
                   help="also run ulysses and flexsp on the pipelines' stages x sp GPUs (on whenever --sp > 1)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help=OPTION_HELP)
    p.add_argument("--json", action="store_true", help="print every figure as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..contract.cost import CostModel, load_profile
    from ..contract.model_config import preset
    from ..contract.units import format_bytes, parse_bytes
    from ..data.lengths import sample_lengths
    from ..planners.bound import memory_lower_bound
    from ..planners.compare import (
        ABLATIONS,
        BASELINES,
        NO_HOST_TIER,
        UNLIMITED_MEMORY,
        bubble_line,
        compare_planners,
        compare_sp_baselines,
        compute_floor_s,
        describe_sp_rows,
        format_rows,
        host_tier_line,
    )
    from ..planners.stage_layers import balance_layers
    from .plan import (
        describe_layout,
        host_budget_from_args,
        layout_from_args,
        model_from_args,
        parse_options,
        profile_for_model,
        with_layout,
    )

    model = model_from_args(args) or preset(BENCH_MODEL)
    name = args.profile or profile_for_model(model)
    profile = load_profile(name)
    cost = with_layout(CostModel(profile, model), layout_from_args(args))
    lengths = sample_lengths(args.dist, args.batch, args.max_len, args.seed, args.at_cap)
    host = host_budget_from_args(args, cost)
    planners = ["epp", *((NO_HOST_TIER,) if host and cost.host_link else ()), UNLIMITED_MEMORY, *BASELINES,
                *(ABLATIONS if args.ablations else ())]
    budget = parse_bytes(args.memory_budget, "--memory-budget")
    options = parse_options(args.option)
    rows = compare_planners(cost, lengths, args.stages, budget, planners, options, host)
    sp_gpus = args.stages * cost.layout.sp if args.sp_baselines or cost.layout.sp > 1 else 0
    if sp_gpus:
        rows |= compare_sp_baselines(cost, lengths, sp_gpus, budget, options)
    floor = compute_floor_s(cost, lengths, args.stages)
    layers = balance_layers(cost, args.stages)
    bound = memory_lower_bound(cost.with_host_tier(host, layers), layers, lengths)
    device_only = memory_lower_bound(cost, layers, lengths)
    if args.json:
        print(json.dumps({"simulated": True, "profile": name, "layout": cost.layout.to_json(), "rows": rows,
                          "compute_floor_s": floor, "memory_lower_bound": bound.bytes,
                          "memory_lower_bound_without_host_tier": device_only.bytes}, indent=1, default=str))
        return 0
    origin = f"derived from {profile.derived_from}" if profile.derived_from else profile.source.split(";")[0]
    shown = args.hf_path or args.model or BENCH_MODEL
    tier = f", host tier {args.host_memory_budget} per device" if host and cost.host_link else ", no host tier"
    print(f"SIMULATED (no hardware was run): {shown} on {args.stages} stages, {args.memory_budget} per device{tier}, "
          f"{args.batch} {args.dist} sequences up to {args.max_len} tokens ({sum(lengths):,} tokens)")
    print(f"profile {name}: {profile.device}, {profile.dtype}, {origin}")
    print(describe_layout(cost.layout))
    print("\n".join(format_rows(rows)))
    if sp_gpus:
        print(describe_sp_rows(rows, sp_gpus))
    epp = rows["epp"]
    versus = f"; epp runs at {epp['iteration_time_s'] / floor:.2f}x it" if epp["planned"] and epp["feasible"] else ""
    print(f"  no plan of this batch beats {floor:.2f}s: the busiest stage's forward and backward of every "
          f"token, as one chunk, with no bubble or recompute{versus}")
    without = f"; without the host tier, {format_bytes(device_only.bytes)}" if device_only.bytes != bound.bytes else ""
    print(f"  memory: {bound}{without}")
    for name in ("epp", UNLIMITED_MEMORY):
        if rows.get(name, {}).get("planned"):
            print(bubble_line(name, rows[name]))
    if epp["planned"]:
        print(host_tier_line(epp))
        print(f"  {planning_line(epp)}")
    return 0


def planning_line(row: dict) -> str:
    """How long epp searched (MEASURED on this machine) and what its deadline cut."""
    deadline = row.get("deadline_s")
    bounded = (f"deadline {deadline:.2f}s, {len(row['skipped_for_time'])} candidate(s) skipped for time"
               if deadline is not None else "no deadline")
    return f"epp planning: {row['planning_s']:.2f}s MEASURED here ({bounded}, {row['pool_size'] or 'no'} pool processes)"
