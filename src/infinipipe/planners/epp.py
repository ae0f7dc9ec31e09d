"""The ``epp`` planner: sequence processor + pipeline grouping + checkpointing ILP + slice-count search.

The slice count K (and with it the time and token thresholds of the processor) trades bubbles
and memory against kernel efficiency and per-chunk overhead. The paper picks K with a
closed-form estimate; here every candidate K is planned completely and run through the
simulator, whose iteration time is the objective. ILP answers are cached by problem digest, so
the grouping search and the final plan of each K solve every distinct pipeline once.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Literal

from ..contract.cost import CostModel
from ..contract.ir import Plan, validate_plan
from ..contract.shapes import ChunkShape
from ..contract.units import format_bytes
from ..sim.simulator import SimResult, simulate
from .grouping import CHECKPOINTING, PipelineCoster, group_pipelines
from .ilp import InfeasibleMemoryError, SolverCache, solve_checkpointing
from .processor import process_sequences
from .request import PlanRequest
from .schedule import epp_schedule

PLANNER_NAMES = {"ilp": "epp", "none": "epp-no-ckpt", "full": "epp-full-ckpt"}
MIN_SLICE_TOKENS = 1024  # below this, slices waste the GPU; the search stops there
SCREEN_CUTS = 3  # cut points a screened K may group at; enough to split off the longest sequences


def token_capacity(cost: CostModel, layers: tuple[int, ...], memory_budget: float, longest: int,
                   full_recompute: bool) -> int:
    """Most tokens one chunk may hold and still fit, alone, on every stage.

    A chunk is costed as the slice of a split sequence (its K/V and dK/dV kept) with every layer
    recomputed when checkpointing is allowed. Windows of several chunks are the ILP's job; this
    only bounds the processor's token threshold.
    """
    last = len(layers) - 1

    def needs(tokens: int) -> list[float]:
        shape = ChunkShape((tokens,), kept=tokens)
        out = []
        for s, n in enumerate(layers):
            first, is_last = s == 0, s == last
            need = cost.model_state_bytes(n, first, is_last) + cost.activation_bytes(
                shape, n, n if full_recompute else 0, first, is_last)
            out.append(need + (cost.head_work_bytes(shape) if is_last else 0.0))
        return out

    def fits(tokens: int) -> bool:
        return max(needs(tokens)) <= memory_budget

    if not fits(1):
        smallest = needs(1)
        worst = max(range(len(layers)), key=smallest.__getitem__)
        raise InfeasibleMemoryError(stage=worst, window=(), min_memory_bytes=smallest[worst], budget=memory_budget)
    lo, hi = 1, longest
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def slice_count_ladder(lo: int, hi: int) -> list[int]:
    """Roughly geometric candidates in ``[lo, hi]`` (ratio ~1.5), both ends included."""
    out, k = [lo], lo
    while k < hi:
        k = min(hi, max(k + 1, round(k * 1.5)))
        out.append(k)
    return out


@dataclasses.dataclass
class _Trial:
    num_slices: int
    screened: bool
    plan: Plan | None
    sim: SimResult | None
    error: str = ""
    seconds: float = 0.0

    @property
    def feasible(self) -> bool:
        return self.sim is not None and self.sim.feasible

    def score(self) -> tuple[int, float]:
        """Fitting plans first, by time; then the least over budget."""
        if self.sim is None:
            return (2, math.inf)
        if self.sim.feasible:
            return (0, self.sim.iteration_time_s)
        return (1, max(o.over_bytes for o in self.sim.oom))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_slices": self.num_slices, "screened": self.screened,
                               "feasible": self.feasible, "planning_s": round(self.seconds, 4)}
        if self.sim is not None:
            out["iteration_time_s"] = self.sim.iteration_time_s
            out["num_chunks"] = self.sim.num_chunks
            out["num_pipelines"] = self.sim.num_pipelines
        if self.error:
            out["error"] = self.error
        return out


def plan_epp(request: PlanRequest, checkpointing: Literal["ilp", "none", "full"] = "ilp") -> Plan:
    """Plan one global batch with EPP; ``checkpointing`` selects the ILP or an ablation.

    The K search first screens each candidate as one pipeline (grouping only where one pipeline
    cannot fit) with a loose ILP gap, optionally runs the full grouping DP on the best
    ``refine_top`` candidates, and re-solves the winner's checkpointing at ``mip_gap``; every
    trial is a complete simulated plan and the fastest that fits wins (knobs: `PlannerOptions`).
    Raises ``ValueError`` when no K fits with checkpointing (naming the closest attempt and why);
    the ``none`` ablation returns its closest plan flagged ``metadata["feasible"] = False``.
    """
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {checkpointing!r}")
    started = time.perf_counter()
    search = _Search(request, checkpointing)
    fixed = request.options.num_slices
    if fixed is not None:
        best = search.trial(fixed, screen=False)
    else:
        best = search.run()
    memory = float(request.memory_budget)
    if best.plan is None or (checkpointing != "none" and not best.feasible):
        reason = best.error or "; ".join(str(o) for o in best.sim.oom)
        raise ValueError(
            f"{PLANNER_NAMES[checkpointing]}: no slice count fits {format_bytes(memory)} per stage "
            f"(tried K = {sorted({k for k, _ in search.trials})}); best attempt K={best.num_slices}: {reason}")
    validate_plan(best.plan)  # trials skip validation; the plan handed on must pass it
    meta = {
        **best.plan.metadata,
        "feasible": best.feasible,
        "iteration_time_s": best.sim.iteration_time_s,
        "search": [t.summary() for _, t in sorted(search.trials.items())],
        "planning_time_s": time.perf_counter() - started,
    }
    return dataclasses.replace(best.plan, metadata=meta)


class _Search:
    def __init__(self, request: PlanRequest, checkpointing: str):
        self.request, self.checkpointing = request, checkpointing
        self.options = opts = request.options
        self.cost, self.layers = request.cost, tuple(request.layers)
        self.memory = float(request.memory_budget)
        self.lengths = list(request.lengths)
        self.longest = max(self.lengths)
        self.token_capacity = opts.token_capacity or token_capacity(
            self.cost, self.layers, self.memory, self.longest, full_recompute=checkpointing != "none")
        self.screen_gap = max(opts.mip_gap, opts.screen_gap)
        self.cache = SolverCache()
        self.trials: dict[tuple[int, bool], _Trial] = {}

    def trial(self, k: int, screen: bool) -> _Trial:
        if (k, screen) not in self.trials:
            t0 = time.perf_counter()
            self.trials[(k, screen)] = self._plan_for(k, screen)
            self.trials[(k, screen)].seconds = time.perf_counter() - t0
        return self.trials[(k, screen)]

    def _plan_for(self, k: int, screen: bool) -> _Trial:
        cost, layers, memory = self.cost, self.layers, self.memory
        try:
            chunks = process_sequences(self.lengths, cost, k, self.token_capacity)
        except ValueError as exc:
            return _Trial(k, screen, None, None, str(exc))
        gap = self.screen_gap if screen else self.options.mip_gap
        # Groupings are compared on loose ILP answers; only the chosen plan is solved at ``gap``.
        coster = PipelineCoster(chunks, self.lengths, cost, layers, memory, self.checkpointing,
                                self.cache, self.screen_gap, self.options.time_limit_s)
        grouping = group_pipelines(coster, max_pipelines=1)
        if not screen:
            grouping = group_pipelines(coster, self.options.max_pipelines, self.options.max_cuts)
        elif not grouping.feasible:
            grouping = group_pipelines(coster, min(2, self.options.max_pipelines),
                                       min(SCREEN_CUTS, self.options.max_cuts))
        meta = {"planner": PLANNER_NAMES[self.checkpointing], "memory_budget": memory, "num_slices": k,
                "token_capacity": self.token_capacity, "grouping_cost_ms": grouping.cost_ms,
                "grouping_evaluated": grouping.evaluated, "screened": screen}
        full = (lambda s, _c: layers[s]) if self.checkpointing == "full" else None
        plan = epp_schedule(chunks, self.lengths, len(layers), layers, pipelines=grouping.pipelines,
                            recompute=full, metadata=meta, validate=False)
        if self.checkpointing == "ilp":
            try:
                plan = solve_checkpointing(plan, cost, memory, gap, self.options.time_limit_s, cache=self.cache)
            except InfeasibleMemoryError as exc:
                return _Trial(k, screen, None, None, str(exc))
        return _Trial(k, screen, plan, simulate(plan, cost, memory, self.request.link))

    def run(self) -> _Trial:
        """Screen a ladder of K, bisect towards the best rung, then fully plan the top few."""
        # Slices under MIN_SLICE_TOKENS waste the device, but one cut is always worth a look:
        # the simulator, not the heuristic, says whether it pays.
        hi = max(1, min(self.options.max_slices, self.longest, max(2, self.longest // MIN_SLICE_TOKENS)))
        lo = min(hi, self.options.min_slices)
        tried = sorted({k for k in slice_count_ladder(lo, hi)})
        for k in tried:
            self.trial(k, True)
        for _ in range(self.options.refine_rounds):
            best = min(tried, key=lambda k: self.trial(k, True).score())
            i = tried.index(best)
            new = {(best + n) // 2 for n in (tried[max(i - 1, 0)], tried[min(i + 1, len(tried) - 1)])} - set(tried)
            if not new:
                break
            for k in new:
                self.trial(k, True)
            tried = sorted(set(tried) | new)
        top = sorted(tried, key=lambda k: self.trial(k, True).score())[:self.options.refine_top]
        for k in top:
            if self.trial(k, True).plan is not None:
                self.trial(k, False)
        best = min(self.trials.values(), key=lambda t: t.score())
        return self.tighten(best)

    def tighten(self, trial: _Trial) -> _Trial:
        """Re-solve a screened winner's checkpointing at ``mip_gap``; keep it if it simulates faster."""
        if not trial.screened or trial.plan is None or self.checkpointing != "ilp":
            return trial
        plan = solve_checkpointing(trial.plan, self.cost, self.memory, self.options.mip_gap,
                                   self.options.time_limit_s, cache=self.cache)
        plan = dataclasses.replace(plan, metadata={**plan.metadata, "screened": False})
        tight = _Trial(trial.num_slices, False, plan, simulate(plan, self.cost, self.memory, self.request.link))
        self.trials.setdefault((trial.num_slices, False), tight)
        return min((tight, trial), key=lambda t: t.score())
