"""``infinipipe simulate PLAN``: cost a Plan with the simulator (iteration time, bubbles, memory)."""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from ..sim.idle import IdleBreakdown
from .plan import add_host_option, add_layout_options, add_model_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="simulate a plan: iteration time, bubbles, peak memory",
                       description=__doc__)
    p.add_argument("plan", type=Path, help="plan JSON written by `infinipipe plan`")
    add_model_options(p, "default: the model the plan was made for")
    add_layout_options(p, "defaults: the layout the plan records; in brackets where it records none")
    p.add_argument("--memory-budget", help="memory budget per device, e.g. 80GiB (default: the plan's)")
    add_host_option(p, None)
    p.add_argument("--latency-us", type=float,
                   help="P2P latency of every pipeline hop in microseconds (default: each hop's link, intra- or "
                        "inter-node, from where the layout places the stages)")
    p.add_argument("--bandwidth-gbps", type=float,
                   help="P2P bandwidth of every pipeline hop in Gbit/s (default: each hop's link, as above)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--chart", type=Path, help="write a Gantt chart and memory timeline PNG here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..contract.ir import Plan, validate_plan
    from ..contract.layout import LinkModel, StageLayout
    from ..contract.units import GIB, parse_bytes
    from ..sim.simulator import simulate
    from .plan import build_cost, describe_layout, host_budget_from_args, layout_from_args, model_from_args, with_layout

    plan = Plan.loads(args.plan.read_text())
    validate_plan(plan)
    profile = args.profile or plan.metadata.get("profile")
    if profile is None:
        raise ValueError("the plan does not name its profile; pass --profile")
    recorded = plan.metadata.get("layout")
    base = StageLayout.from_json(recorded) if recorded else StageLayout()
    cost = build_cost(profile, model_from_args(args) or plan.metadata.get("model"))
    cost = with_layout(cost, layout_from_args(args, base))
    memory = (parse_bytes(args.memory_budget, "--memory-budget") if args.memory_budget
              else plan.metadata.get("memory_budget"))
    link = None
    if args.latency_us is not None or args.bandwidth_gbps is not None:
        hop = cost.layout.inter_node
        link = LinkModel(hop.latency_s if args.latency_us is None else args.latency_us * 1e-6,
                         hop.bandwidth_Bps if args.bandwidth_gbps is None else args.bandwidth_gbps * 1e9 / 8)
    host = host_budget_from_args(args, cost) if args.host_memory_budget is not None else None
    result = simulate(plan, cost, memory, link, host_memory_budget=host)
    if args.chart:
        from ..sim.charts import draw_chart

        draw_chart(plan, result, args.chart)
    if args.json:
        print(json.dumps({**result.to_json(), "simulated": True, "profile": profile, "layout": cost.layout.to_json()},
                         indent=1))
    else:
        print(f"SIMULATED with profile {profile}: {result.planner or 'plan'}, {result.num_chunks} chunks, "
              f"{result.num_pipelines} pipeline(s)")
        print(f"  {describe_layout(cost.layout)}")
        schedule = result.schedule_bubble_ratio
        print(f"  iteration time {result.iteration_time_s:.4f} s, bubble ratio {result.bubble_ratio:.1%} "
              f"({result.bubble_ratio - schedule:.1%} stage imbalance, {schedule:.1%} the schedule's), "
              f"recompute {result.recompute_time_s:.4f} s (all stages)")
        for s, peak in enumerate(result.peak_memory_bytes):
            host = ""
            if result.offloaded_bytes[s] or result.peak_host_bytes[s]:
                host = (f"; host: {result.offloaded_bytes[s] / GIB:.1f} GiB offloaded, "
                        f"peak {result.peak_host_bytes[s] / GIB:.2f} GiB, waited {result.exposed_copy_s[s]:.4f} s for copies")
            print(f"  stage {s}: busy {result.busy_s[s]:.4f} s ({result.imbalance_s[s]:.4f} s less than the busiest), "
                  f"peak memory {peak / GIB:.2f} GiB{host}")
            print(f"    {describe_idle(result.idle_breakdown[s])}")
        print(f"  {most_idle(result.idle_breakdown)}")
        print("  fits in memory" if result.feasible else "  OUT OF MEMORY: " + "; ".join(map(str, result.oom)))
    return 0


def describe_idle(idle: IdleBreakdown) -> str:
    """One stage's idle time by category: ``idle 3.210 s: fill 0.300, forward wait 0.000, ...``."""
    parts = ", ".join(f"{name.replace('_', ' ')} {seconds:.3f}" for name, seconds in idle.to_json().items())
    return f"idle {idle.total_s:.3f} s: {parts}"


def most_idle(per_stage: Sequence[IdleBreakdown]) -> str:
    """Which category costs most over all stages, and its share of their idle time."""
    total = IdleBreakdown.summed(per_stage)
    if total.total_s <= 0:
        return "no idle time"
    name = total.largest
    seconds = getattr(total, name)
    return (f"most idle time: {name.replace('_', ' ')}, {seconds:.3f} s of {total.total_s:.3f} s over all stages "
            f"({seconds / total.total_s:.0%})")
