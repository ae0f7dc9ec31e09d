"""``infinipipe plan``: plan one global batch with a named planner and write the Plan as JSON."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..contract.units import parse_bytes
from ..planners.options import PlannerOptions


def parse_options(words: list[str]) -> PlannerOptions:
    """``key=value`` words into `PlannerOptions` over the commands' defaults (`BEHIND_A_STEP`:
    a deadline and a pool); a value is read as JSON when it parses (numbers, true/false, null),
    else as a string, then checked against the option's type."""
    values: dict[str, object] = {}
    for text in words:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects key=value, got {text!r}")
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = value
    return PlannerOptions.behind_a_step(values)


PLAN_MODEL = "llama-7b"
OPTION_HELP = ("planner option, repeatable (e.g. chunk_tokens=8192, recompute=2; deadline_share=0 searches without "
               "a deadline, pool_size=0 in this process alone)")


def add_model_options(p: argparse.ArgumentParser, model_default: str) -> None:
    """``--model``, ``--hf-path`` and ``--profile``, as `plan`, `simulate` and `bench` read them."""
    p.add_argument("--model", metavar="PRESET", help=f"model preset ({model_default})")
    p.add_argument("--hf-path", metavar="DIR",
                   help="a Hugging Face model folder: the model's shape from its config.json (instead of --model)")
    p.add_argument("--profile", metavar="NAME_OR_FILE",
                   help="committed cost profile name or profile JSON file (default: the committed profile "
                        "measured for the model's shape)")


HOST_DEFAULT = "128GiB"


def add_host_option(p: argparse.ArgumentParser, default: str | None) -> None:
    """``--host-memory-budget``: the host memory per device the host tier may fill."""
    p.add_argument("--host-memory-budget", default=default, metavar="SIZE",
                   help="host memory per device for offloaded activations and the optimizer state, e.g. 128GiB; "
                        "0 turns the host tier off (default: " + (default or "the plan's") + ")")


def host_budget_from_args(args: argparse.Namespace, cost) -> float:
    """The ``--host-memory-budget`` in bytes, refused where the profile's host cannot give it."""
    budget = float(parse_bytes(args.host_memory_budget, "--host-memory-budget", allow_zero=True))
    link = cost.host_link
    if budget and link is not None and budget > link.host_memory_bytes:
        raise ValueError(f"--host-memory-budget {args.host_memory_budget} ({budget:.0f} bytes) is more than the "
                         f"{link.host_memory_bytes:.0f} bytes of host memory per device the profile's host has")
    return budget


def add_layout_options(p: argparse.ArgumentParser, default: str) -> None:
    """``--sp``, ``--dp-shard``, ``--dp-replicate``, ``--gpus-per-node``, the link options and
    ``--links``: the ranks of a stage, their links and the pipeline hops', as `plan`, `simulate`
    and `bench` cost them."""
    g = p.add_argument_group("stage layout", f"the ranks that run each stage and their links ({default})")
    g.add_argument("--sp", type=int, metavar="N", help="Ulysses sequence-parallel degree inside a stage (1)")
    g.add_argument("--dp-shard", type=int, metavar="N",
                   help="FSDP degree: a stage's parameters shard over dp-shard x sp ranks, gathered once per step; "
                        "the batch is one of the dp-shard replicas' share (1)")
    g.add_argument("--dp-replicate", type=int, metavar="N",
                   help="replicas of each stage; with sp and dp-shard it places the stages on nodes, which decides "
                        "the link of each pipeline hop (1)")
    g.add_argument("--gpus-per-node", type=int, metavar="N", help="consecutive ranks on one node (8)")
    g.add_argument("--intra-node-gbps", type=float, metavar="GBIT", help="per-GPU bandwidth inside a node, Gbit/s (1200)")
    g.add_argument("--inter-node-gbps", type=float, metavar="GBIT", help="per-GPU bandwidth between nodes, Gbit/s (200)")
    g.add_argument("--intra-node-latency-us", type=float, metavar="US", help="collective latency inside a node (10)")
    g.add_argument("--inter-node-latency-us", type=float, metavar="US", help="collective latency between nodes (10)")
    g.add_argument("--links", metavar="FILE",
                   help="links measured by `infinipipe profile --links`; the link options above still win")


def layout_from_args(args: argparse.Namespace, base=None):
    """``base`` (default: one rank per stage on NVLink and InfiniBand) with the layout options given."""
    from ..contract.layout import LinkModel, StageLayout, read_links

    base = base or StageLayout()
    for flag in ("sp", "dp_shard", "dp_replicate", "gpus_per_node"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    links = {"intra_node": base.intra_node, "inter_node": base.inter_node}
    if args.links:
        links.update(read_links(args.links))
    for where in links:
        gbps, latency_us = getattr(args, f"{where}_gbps"), getattr(args, f"{where}_latency_us")
        flag = f"--{where.replace('_', '-')}"
        if gbps is not None and not gbps > 0:
            raise ValueError(f"{flag}-gbps must be > 0, got {gbps}")
        if latency_us is not None and latency_us < 0:
            raise ValueError(f"{flag}-latency-us must be >= 0, got {latency_us}")
        links[where] = LinkModel(links[where].latency_s if latency_us is None else latency_us / 1e6,
                                 links[where].bandwidth_Bps if gbps is None else gbps * 1e9 / 8)
    sp = args.sp or base.sp
    dp_shard = args.dp_shard or base.fsdp // base.sp
    return StageLayout(sp=sp, fsdp=dp_shard * sp, reshard_per_chunk=base.reshard_per_chunk,
                       gpus_per_node=args.gpus_per_node or base.gpus_per_node,
                       dp_replicate=args.dp_replicate or base.dp_replicate, **links)


def with_layout(cost, layout):
    """``cost`` on ``layout``; an SP degree above the model's attention heads is refused."""
    if layout.sp > cost.model.heads:
        raise ValueError(f"--sp {layout.sp} exceeds the model's {cost.model.heads} attention heads "
                         "(Ulysses spreads heads over the SP ranks)")
    return dataclasses.replace(cost, layout=layout)


def describe_layout(layout) -> str:
    """One line for a human: the degrees and the links they are charged on."""
    def link(m) -> str:
        return f"{m.bandwidth_Bps * 8 / 1e9:.4g} Gbit/s, {m.latency_s * 1e6:.4g} us"

    return (f"layout: sp {layout.sp}, parameters sharded over {layout.fsdp} rank(s), {layout.dp_replicate} replica(s), "
            f"{layout.gpus_per_node} GPUs per node; intra-node {link(layout.intra_node)}; "
            f"inter-node {link(layout.inter_node)}")


def model_from_args(args: argparse.Namespace):
    """The model named by ``--model`` or ``--hf-path`` (``None`` when neither is given)."""
    from ..contract.model_config import preset

    if args.model and args.hf_path:
        raise ValueError("give --model or --hf-path, not both")
    if args.hf_path:
        from ..model.hf import read_hf_config

        return read_hf_config(args.hf_path)
    return preset(args.model) if args.model else None


def profile_for_model(model) -> str:
    """The committed profile measured for ``model``'s cost shape (an H100 one first)."""
    from ..contract.cost import committed_profiles, load_profile

    for name in sorted(committed_profiles(), key=lambda n: not n.startswith("h100")):
        if load_profile(name).model.cost_shape() == model.cost_shape():
            return name
    raise ValueError("no committed profile was measured for this model's shape; pass --profile "
                     "(`infinipipe profile` measures one)")


def build_cost(profile_ref: str, model):
    """A CostModel from a committed profile name or a profile file, for ``model`` (default: the
    profile's own model; a dict is a model's JSON, as plans record it)."""
    from ..contract.cost import CostModel, load_profile
    from ..contract.model_config import ModelConfig

    profile = load_profile(profile_ref)
    if isinstance(model, dict):
        model = ModelConfig.from_json(model)
    return CostModel(profile, model or profile.model)


def register(sub: argparse._SubParsersAction) -> None:
    from ..data.lengths import DISTRIBUTIONS
    from ..planners.registry import PLANNERS

    p = sub.add_parser("plan", help="plan one global batch and write the Plan as JSON",
                       description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--lengths", type=Path, help="file of sequence lengths, one integer per line")
    src.add_argument("--dist", choices=DISTRIBUTIONS, help="sample lengths from a named distribution")
    p.add_argument("--batch", type=int, default=512, help="sequences to sample with --dist (default 512)")
    p.add_argument("--max-len", type=int, default=98304,
                   help="context length: sampled lengths are truncated to it (default 98304)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--at-cap", type=int, default=0, metavar="N",
                   help="with --dist: at least N sequences at the context length (default 0)")
    add_model_options(p, f"default {PLAN_MODEL}, or the profile's model when --profile is given")
    p.add_argument("--stages", type=int, default=8, help="pipeline stages (default 8)")
    add_layout_options(p, "defaults in brackets")
    p.add_argument("--memory-budget", default="80GiB", help="memory budget per device (default 80GiB)")
    add_host_option(p, HOST_DEFAULT)
    p.add_argument("--layers", help="layers per stage, comma separated (default: balanced by cost)")
    p.add_argument("--planner", default="epp", choices=sorted(PLANNERS))
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help=OPTION_HELP)
    p.add_argument("--out", type=Path, required=True, help="where to write the plan JSON")
    p.add_argument("--explain", action="store_true",
                   help="print the candidates the search tried (simulated) and why the winner won")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..contract.layout import StageLayout
    from ..data.lengths import read_lengths, sample_lengths
    from ..planners.epp import NoPlanError
    from ..planners.registry import make_plan
    from ..planners.request import PlanRequest

    if args.lengths is not None:
        lengths = read_lengths(args.lengths)
        source = f"file {args.lengths.name}"
    else:
        lengths = sample_lengths(args.dist, args.batch, args.max_len, args.seed, args.at_cap)
        capped = f", {args.at_cap}+ at the cap" if args.at_cap else ""
        source = f"{args.dist} (batch {args.batch}, max length {args.max_len}, seed {args.seed}{capped})"
    model = model_from_args(args)
    if args.profile is None:
        if model is None:
            from ..contract.model_config import preset

            model = preset(PLAN_MODEL)
        args.profile = profile_for_model(model)
    cost = with_layout(build_cost(args.profile, model), layout_from_args(args))
    layers = None
    if args.layers:
        try:
            layers = [int(x) for x in args.layers.split(",")]
        except ValueError:
            raise ValueError(f"--layers expects comma-separated integers, got {args.layers!r}") from None
    request = PlanRequest(lengths, cost, args.stages, parse_bytes(args.memory_budget, "--memory-budget"), layers,
                          parse_options(args.option), host_memory_budget=host_budget_from_args(args, cost))
    try:
        plan = make_plan(args.planner, request)
    except NoPlanError as exc:
        if args.explain:
            from ..planners.explain import explain_metadata

            print("\n".join(explain_metadata(exc.metadata)))
        raise
    plan = dataclasses.replace(plan, metadata={
        **plan.metadata, "profile": args.profile, "model": cost.model.to_json(),
        "memory_budget": request.memory_budget, "lengths_source": source, "layout": cost.layout.to_json(),
    })
    args.out.write_text(plan.dumps() + "\n")
    if args.explain:
        from ..planners.explain import explain_lines

        print("\n".join(explain_lines(plan)))
    name = args.hf_path or args.model or (PLAN_MODEL if model is not None else "the profile's model")
    print(f"{args.planner} for {name} with profile {args.profile}: {len(lengths)} sequences ({sum(lengths)} tokens) "
          f"-> {len(plan.chunks)} chunks, "
          f"{len(plan.pipelines)} pipeline(s), layers {list(plan.layers_per_stage)}; wrote {args.out}",
          file=sys.stderr)
    if cost.layout != StageLayout():
        print(describe_layout(cost.layout), file=sys.stderr)
    moved = plan.metadata.get("offloaded_bytes")
    if moved:
        from ..planners.compare import host_tier_line
        from ..sim.simulator import simulate

        print(host_tier_line(simulate(plan, cost).to_json()).strip(), file=sys.stderr)
    return 0
