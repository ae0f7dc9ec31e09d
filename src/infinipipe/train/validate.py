"""Everything about a job that can be checked before any process starts.

A mistake found by the ranks costs their start-up (tens of seconds) and a page of tracebacks;
found here, in the launching process, it is one ``ValueError`` naming the key, which the command
line prints as ``infinipipe train: error: ...``. The checks run cheapest first: the planner's
name, the degrees against the model's layers, the cost profile against the model, and then, with
the corpus loaded, the first step planned for real, so a memory budget too small for the model
is refused with the smallest budget that fits. The checkpoint a job would resume is checked by
its manifest, file sizes and model (hashing its files is left to the ranks, a share each).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from ..config import Config, load_config
from ..contract.cost import CostModel
from ..data.dataset import TokenDataset, build_sampler
from ..planners.epp import NoPlanError
from ..planners.ilp_problem import InfeasibleMemoryError
from ..planners.registry import PLANNERS
from ..planners.stage_layers import balance_layers
from ..runtime.parallel_dims import ParallelDims
from .checkpoint import CONFIG, CheckpointError, checkpoint_problems, checkpoint_steps, missing_load_step
from .planning import StepPlanner, job_cost, run_planner_options


@dataclass(frozen=True)
class JobShape:
    """What the checks worked out and the ranks use: the cost model and the layers per stage."""

    cost: CostModel
    layers_per_stage: tuple[int, ...]


def check_config(cfg: Config) -> JobShape:
    """The checks that need no data: planner, degrees against layers, profile against model."""
    if cfg.epp.planner not in PLANNERS:
        raise ValueError(f"epp.planner {cfg.epp.planner!r} is not a planner; known: {', '.join(sorted(PLANNERS))}")
    model = cfg.model_config()
    pp = cfg.parallelism.pipeline_parallel_degree
    if pp > model.layers:
        raise ValueError(f"parallelism.pipeline_parallel_degree = {pp} exceeds the model's {model.layers} layers "
                         "(every stage holds at least one layer)")
    cost = job_cost(cfg, model)
    check_host_budget(cfg, cost)
    return JobShape(cost, balance_layers(cost, pp))


def check_host_budget(cfg: Config, cost) -> None:
    """A host tier this machine cannot give is refused before anything starts: its ranks' host
    budgets together must fit the machine's memory (used only where the profile has a host link)."""
    budget = cfg.epp.host_memory_budget_bytes
    if not budget or cost.host_link is None:
        return
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", ParallelDims.from_config(cfg.parallelism).world_size))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if budget * ranks_here > ram:
        raise ValueError(f"epp.host_memory_budget = {cfg.epp.host_memory_budget} per device x {ranks_here} rank(s) on "
                         f"this machine is {budget * ranks_here} bytes, more than its {ram} bytes of memory; set at "
                         f"most --epp.host_memory_budget={_round_down(ram // ranks_here)} (or 0 to turn the tier off)")


def check_first_step(cfg: Config, dataset: TokenDataset, shape: JobShape) -> None:
    """Plan step 0 as the job will: a budget the model cannot fit is refused with the one it needs."""
    dims = ParallelDims.from_config(cfg.parallelism)
    planner = StepPlanner(shape.cost, build_sampler(cfg, dataset), cfg.epp.planner, dims.pp, dims.dp,
                          cfg.epp.memory_budget_bytes, shape.layers_per_stage, run_planner_options(cfg),
                          cfg.epp.host_memory_budget_bytes)
    try:
        planner(0)
    except InfeasibleMemoryError as exc:
        raise ValueError(f"epp.memory_budget = {cfg.epp.memory_budget} is too small for this model: {exc}; "
                         f"set at least --epp.memory_budget={_round_up(exc.min_memory_bytes)}") from None
    except NoPlanError as exc:
        raise ValueError(f"epp.memory_budget = {cfg.epp.memory_budget} is too small for this batch: {exc}; "
                         f"set at least --epp.memory_budget={_round_up(exc.need_bytes)}") from None


def check_checkpoints(cfg: Config, run_dir: Path) -> None:
    """What resuming would refuse: a ``load_step`` that is not there, no checkpoint left whose
    files match its manifest in name and size, or one written for another model."""
    if not cfg.checkpoint.enable:
        return
    folder = run_dir / cfg.checkpoint.folder
    steps = checkpoint_steps(folder)
    load = cfg.checkpoint.load_step
    if load > 0 and load not in steps:
        raise missing_load_step(folder, load, steps)
    problems = {}
    for step in [load] if load > 0 else sorted(steps, reverse=True):
        problems[step] = checkpoint_problems(steps[step], hash_files=False)
        if not problems[step]:
            _check_model(steps[step], cfg)
            return
    if load > 0:
        raise CheckpointError(f"checkpoint {steps[load]} is damaged: {'; '.join(problems[load])}")
    if problems:
        found = "; ".join(f"{steps[s].name}: {p[0]}" for s, p in problems.items())
        raise CheckpointError(f"no intact checkpoint in {folder} ({found}); move them elsewhere, or use another "
                              "--run-dir or --checkpoint.enable=false to start over")


def _check_model(checkpoint: Path, cfg: Config) -> None:
    """Refuse to resume weights of another shape (a rerun with another model in a used directory)."""
    try:
        saved = load_config(checkpoint / CONFIG).model_config()
    except (OSError, ValueError):
        return  # an older checkpoint without its config, or one whose model is no longer readable
    model = cfg.model_config()
    changed = [f"{f.name} {getattr(saved, f.name)} -> {getattr(model, f.name)}" for f in fields(model)
               if getattr(saved, f.name) != getattr(model, f.name)]
    if changed:
        raise CheckpointError(f"checkpoint {checkpoint} holds another model than this job's ({', '.join(changed)}); "
                              f"resume it with its own config ({checkpoint / CONFIG}), or use another --run-dir "
                              "or --checkpoint.enable=false to start over")


def _round_down(nbytes: float) -> str:
    """A budget a person would type that ``nbytes`` holds: whole GiB, else whole MiB."""
    return f"{int(nbytes) // 2**30}GiB" if nbytes >= 2**30 else f"{int(nbytes) // 2**20}MiB"


def _round_up(nbytes: float) -> str:
    """A budget a person would type that holds ``nbytes``: whole MiB, or GiB with one decimal."""
    mib = 2**20
    if nbytes < 2**30:
        return f"{-(-int(nbytes) // mib)}MiB"
    return f"{-(-int(nbytes * 10) // 2**30) / 10:g}GiB"

