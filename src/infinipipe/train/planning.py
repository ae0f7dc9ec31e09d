"""What the trainer plans each step: the global batch's split over replicas and one Plan each.

`StepPlanner` is a plain, picklable value: the planner of step ``i`` needs only the corpus's
document lengths, the sampler's seed and the cost model, so it can run in a background process
while step ``i - 1`` trains, and every rank can check it received the plan for the right batch.
It also simulates the plans it hands out (`predict`), off the training ranks: the step's metrics
compare with those figures, and each rank grows its host tier to its stage's predicted host peak
before the step, so the first step that offloads has room.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import Config
from ..contract.cost import CostModel, Profile, default_profile_name, load_profile
from ..contract.ir import Plan
from ..contract.model_config import ModelConfig
from ..data.dataset import BatchSampler
from ..planners.candidates import WarmStart
from ..planners.data_parallel import split_batch, whole_sequence_cost
from ..planners.options import PlannerOptions
from ..planners.registry import make_plan
from ..planners.request import PlanRequest
from ..profiling.fit import flops_head_terms
from ..runtime.parallel_dims import ParallelDims
from ..sim.simulator import simulate


@dataclass(frozen=True)
class PlanAsk:
    """What the trainer knows when it asks for step ``step``'s plans: the measured time of the
    last step that ran (the base of the planning deadline; None before any has) and the last
    plans' winning choices, one per replica (the warm starts of their searches)."""

    step: int
    step_s: float | None = None
    warm: tuple[WarmStart, ...] = ()


class PlanAsks:
    """The asks of steps ``start..steps - 1``, each drawn when the planner is about to start on
    it: with the time of the last step that ran (`stepped`) and the winners of the last plans
    handed out (`learned`)."""

    def __init__(self, start: int, steps: int):
        self.start, self.steps = start, steps
        self.step_s: float | None = None
        self.warm: tuple[WarmStart, ...] = ()

    def __iter__(self):
        for step in range(self.start, self.steps):
            yield PlanAsk(step, self.step_s, self.warm)

    def planned_by(self, planner: "StepPlanner"):
        """Each step's plans, planned in this process when the step asks (no prefetch)."""
        for ask in self:
            plans = planner(ask)
            self.learned(plans)
            yield plans

    def learned(self, plans: "StepPlans") -> None:
        self.warm = plans.next_warm()

    def stepped(self, step_s: float) -> None:
        self.step_s = step_s


@dataclass(frozen=True)
class StepPlans:
    """Plans of one step: ``shares[r]`` are the global-batch positions replica ``r`` trains on;
    ``deadline_s`` the planning deadline the searches had (None: none), ``skipped_for_time``
    how many candidates they left out for it; ``predicted``: the simulator's figures (`predict`)."""

    step: int
    shares: tuple[tuple[int, ...], ...]
    plans: tuple[Plan, ...]
    planning_s: float
    deadline_s: float | None = None
    skipped_for_time: int = 0
    predicted: dict = field(default_factory=dict)

    def host_room(self, replica: int, stage: int) -> int:
        """The host-tier bytes ``stage`` of ``replica``'s plan is predicted to use at once
        (offloaded activations and an optimizer state waiting on the host)."""
        return math.ceil(self.predicted["peak_host_bytes"][replica][stage])

    def next_warm(self) -> tuple[WarmStart, ...]:
        """The warm starts of the next step's searches: what won here."""
        return tuple(WarmStart.from_plan(p) for p in self.plans)


def predict(plans: Sequence[Plan], cost: CostModel, memory_budget: int) -> dict:
    """The simulator's figures of a step's plans (per replica, and per stage where a stage has its
    own): iteration time and bubble, device and host peaks, offloaded bytes and copy waits."""
    sims = [simulate(p, cost, memory_budget) for p in plans]
    return {
        "bubble_ratio": max(s.bubble_ratio for s in sims),
        "iteration_time_s": max(s.iteration_time_s for s in sims),
        "peak_step_bytes": [list(s.peak_step_bytes) for s in sims],
        "offloaded_bytes": [list(s.offloaded_bytes) for s in sims],
        "peak_host_bytes": [list(s.peak_host_bytes) for s in sims],
        "exposed_copy_s": [list(s.exposed_copy_s) for s in sims],
    }


def profile_for(cfg: Config, model: ModelConfig) -> Profile:
    """The configured profile (or the committed one of the model's preset), fitted to ``model``.

    Layer terms hold for any model of the same layer shape (RoPE base and norm epsilon change no
    cost, see `ModelConfig.cost_shape`); the embedding and head terms of a
    profile are derived from FLOPs and bytes, so a model that differs only in vocabulary (a capped
    tokenizer) gets them recomputed from the profile's own measured throughput.
    """
    name = cfg.epp.profile or default_profile_name(cfg.model.flavor)
    try:
        profile = load_profile(name)
    except (ValueError, KeyError, TypeError) as exc:
        if not Path(name).is_file():
            raise
        raise ValueError(f"epp.profile {name!r}: not a readable profile ({type(exc).__name__}: {exc})") from None
    if profile.model.cost_shape() == model.cost_shape():
        return profile
    if replace(profile.model, vocab_size=model.vocab_size).cost_shape() != model.cost_shape():
        raise ValueError(
            f"epp.profile {name!r} was measured for layer shape {profile.model.to_json()}, which differs from "
            f"the model's {model.to_json()} in more than the vocabulary; run `infinipipe profile` for this model"
        )
    tflops = profile.fit_error.get("matmul_tflops")
    if not tflops:
        raise ValueError(f"epp.profile {name!r} lacks the matmul throughput needed to rescale its head terms")
    bandwidth = profile.fit_error.get("copy_bytes_per_s")
    head = flops_head_terms(model, profile.dtype, tflops, **({"bytes_per_s": bandwidth} if bandwidth else {}))
    return replace(profile, model=model, derived_from=name,
                   source=f"{profile.source}; head terms recomputed for vocabulary {model.vocab_size}", **head)


def check_precision(profile: Profile, dtype) -> None:
    """Plans made from a profile of another precision misjudge every byte and millisecond."""
    run = str(dtype).removeprefix("torch.")
    if profile.dtype != run:
        raise ValueError(
            f"the profile ({profile.derived_from or profile.source or profile.device}) was measured in "
            f"{profile.dtype}, this run trains in {run}: set epp.profile to a {run} profile of this model "
            f"(`infinipipe profile --dtype {run}`) or training.mixed_precision to match the profile")


RUN_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def job_cost(cfg: Config, model: ModelConfig, dims: ParallelDims | None = None) -> CostModel:
    """The cost model a run plans with: its profile, checked against the run's precision, the
    optimizer-state bytes of that precision (fp32 master weights under bf16), and the layout of a
    stage's ranks, so SP divides compute and activations and FSDP shards the model states.

    Parameters shard over ``dp_shard x sp`` ranks and are gathered once per step, as the runtime
    does; ``dims`` (default: the configured degrees) resolves ``data_parallel_shard_degree = -1``.
    """
    profile = profile_for(cfg, model)
    check_precision(profile, RUN_DTYPES[cfg.training.mixed_precision])
    dims = dims or ParallelDims.from_config(cfg.parallelism)
    return CostModel(profile, model, layout=cfg.cluster.stage_layout(dims.sp, dims.fsdp, dims.dp_replicate))


@dataclass(frozen=True)
class StepPlanner:
    cost: CostModel
    sampler: BatchSampler
    planner: str
    num_stages: int
    dp: int
    memory_budget: int
    layers_per_stage: tuple[int, ...]
    options: PlannerOptions
    host_memory_budget: int = 0
    warm_start: bool = True

    def __call__(self, ask: PlanAsk | int) -> StepPlans:
        """The step's plans. The replicas' searches share one deadline: ``deadline_share`` of the
        last step's time, counted from the start of this call (each still returns a plan that
        fits); ``deadline_s``, where set, is that budget instead."""
        ask = ask if isinstance(ask, PlanAsk) else PlanAsk(ask)
        t0 = time.perf_counter()
        step = ask.step
        opts = self.options
        budget = opts.deadline_s if opts.deadline_s is not None else (
            opts.deadline_share * ask.step_s if ask.step_s is not None and opts.deadline_share > 0 else None)
        lengths = [int(n) for n in self.sampler.lengths[self.sampler.doc_ids(step)]]
        shares = split_batch(lengths, self.dp, whole_sequence_cost(self.cost))
        plans = []
        for r, share in enumerate(shares):
            if budget is not None:
                left = max(budget - (time.perf_counter() - t0), MIN_DEADLINE_S)
                opts = replace(self.options, deadline_s=left)
            warm = ask.warm[r] if self.warm_start and r < len(ask.warm) else None
            request = PlanRequest([lengths[i] for i in share], self.cost, self.num_stages, self.memory_budget,
                                  self.layers_per_stage, opts, step_s=ask.step_s, warm=warm,
                                  host_memory_budget=self.host_memory_budget)
            plans.append(make_plan(self.planner, request))
        deadlines = [p.metadata.get("deadline_s") for p in plans]
        planning_s = time.perf_counter() - t0
        return StepPlans(step, tuple(tuple(s) for s in shares), tuple(plans), planning_s,
                         budget if budget is not None else max((d for d in deadlines if d is not None), default=None),
                         sum(len(p.metadata.get("skipped_for_time", ())) for p in plans),
                         predict(plans, self.cost, self.memory_budget))


def run_planner_options(cfg: Config) -> PlannerOptions:
    """The options a run plans with: its ``[epp]`` section's, or under ``training.deterministic``
    the same with nothing that bounds wall time (no deadline, no pool, no ILP time limit), so a
    plan depends on its batch alone."""
    options = cfg.epp.planner_options()
    if cfg.training.deterministic:
        options = replace(options, deadline_s=None, deadline_share=0.0, pool_size=0, time_limit_s=math.inf)
    return options


MIN_DEADLINE_S = 1e-3  # a replica planned after the shared deadline still gets its first fitting plan
