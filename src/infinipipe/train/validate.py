"""Everything about a job that can be checked before any process starts.

A mistake found by the ranks costs their start-up (tens of seconds) and a page of tracebacks;
found here, in the launching process, it is one ``ValueError`` naming the key, which the command
line prints as ``infinipipe train: error: ...``. The checks run cheapest first: the planner's
name, the degrees against the model's layers, the cost profile against the model, and then, with
the corpus loaded, the first step planned for real, so a memory budget too small for the model
is refused with the smallest budget that fits.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import Config
from ..contract.cost import CostModel
from ..data.dataset import TokenDataset, build_sampler
from ..planners.epp import NoPlanError
from ..planners.ilp import InfeasibleMemoryError
from ..planners.registry import PLANNERS
from ..planners.stage_layers import balance_layers
from ..runtime.parallel_dims import ParallelDims
from .planning import StepPlanner, job_cost


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
    return JobShape(cost, balance_layers(cost, pp))


def check_first_step(cfg: Config, dataset: TokenDataset, shape: JobShape) -> None:
    """Plan step 0 as the job will: a budget the model cannot fit is refused with the one it needs."""
    dims = ParallelDims.from_config(cfg.parallelism)
    planner = StepPlanner(shape.cost, build_sampler(cfg, dataset), cfg.epp.planner, dims.pp, dims.dp,
                          cfg.epp.memory_budget_bytes, shape.layers_per_stage, cfg.epp.planner_options())
    try:
        planner(0)
    except InfeasibleMemoryError as exc:
        raise ValueError(f"epp.memory_budget = {cfg.epp.memory_budget} is too small for this model: {exc}; "
                         f"set at least --epp.memory_budget={_round_up(exc.min_memory_bytes)}") from None
    except NoPlanError as exc:
        need = exc.bound.bytes if exc.closest_bytes is None else exc.closest_bytes
        raise ValueError(f"epp.memory_budget = {cfg.epp.memory_budget} is too small for this batch: {exc}; "
                         f"set at least --epp.memory_budget={_round_up(need)}") from None


def _round_up(nbytes: float) -> str:
    """A budget a person would type that holds ``nbytes``: whole MiB, or GiB with one decimal."""
    mib = 2**20
    if nbytes < 2**30:
        return f"{-(-int(nbytes) // mib)}MiB"
    return f"{-(-int(nbytes * 10) // 2**30) / 10:g}GiB"

