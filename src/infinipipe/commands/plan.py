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
    """``key=value`` words into `PlannerOptions`; a value is read as JSON when it parses
    (numbers, true/false), else as a string, then checked against the option's type."""
    values: dict[str, object] = {}
    for text in words:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects key=value, got {text!r}")
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = value
    return PlannerOptions.from_mapping(values)


PLAN_MODEL = "llama-7b"


def add_model_options(p: argparse.ArgumentParser, model_default: str) -> None:
    """``--model``, ``--hf-path`` and ``--profile``, as `plan`, `simulate` and `bench` read them."""
    p.add_argument("--model", metavar="PRESET", help=f"model preset ({model_default})")
    p.add_argument("--hf-path", metavar="DIR",
                   help="a Hugging Face model folder: the model's shape from its config.json (instead of --model)")
    p.add_argument("--profile", metavar="NAME_OR_FILE",
                   help="committed cost profile name or profile JSON file (default: the committed profile "
                        "measured for the model's shape)")


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
    add_model_options(p, f"default {PLAN_MODEL}, or the profile's model when --profile is given")
    p.add_argument("--stages", type=int, default=8, help="pipeline stages (default 8)")
    p.add_argument("--memory-budget", default="80GiB", help="memory budget per device (default 80GiB)")
    p.add_argument("--layers", help="layers per stage, comma separated (default: balanced by cost)")
    p.add_argument("--planner", default="epp", choices=sorted(PLANNERS))
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="planner option, repeatable (e.g. chunk_tokens=8192, recompute=2)")
    p.add_argument("--out", type=Path, required=True, help="where to write the plan JSON")
    p.add_argument("--explain", action="store_true",
                   help="print the candidates the search tried (simulated) and why the winner won")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.lengths import read_lengths, sample_lengths
    from ..planners.registry import make_plan
    from ..planners.request import PlanRequest

    if args.lengths is not None:
        lengths = read_lengths(args.lengths)
        source = f"file {args.lengths.name}"
    else:
        lengths = sample_lengths(args.dist, args.batch, args.max_len, args.seed)
        source = f"{args.dist} (batch {args.batch}, max length {args.max_len}, seed {args.seed})"
    model = model_from_args(args)
    if args.profile is None:
        if model is None:
            from ..contract.model_config import preset

            model = preset(PLAN_MODEL)
        args.profile = profile_for_model(model)
    cost = build_cost(args.profile, model)
    layers = None
    if args.layers:
        try:
            layers = [int(x) for x in args.layers.split(",")]
        except ValueError:
            raise ValueError(f"--layers expects comma-separated integers, got {args.layers!r}") from None
    request = PlanRequest(lengths, cost, args.stages, parse_bytes(args.memory_budget, "--memory-budget"), layers,
                          parse_options(args.option))
    plan = make_plan(args.planner, request)
    plan = dataclasses.replace(plan, metadata={
        **plan.metadata, "profile": args.profile, "model": cost.model.to_json(),
        "memory_budget": request.memory_budget, "lengths_source": source,
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
    return 0
