"""The ``epp`` planner: sequence processor + pipeline grouping + checkpointing ILP + slice-count search.

The slice count K (and with it the time and token thresholds of the processor) trades bubbles
and memory against kernel efficiency and per-chunk overhead. The paper picks K with a
closed-form estimate; here every candidate K is planned completely and run through the
simulator, whose iteration time is the objective. ILP answers are cached by problem digest, so
the grouping search and the final plan of each K solve every distinct pipeline once.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import gc
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from ..contract.cost import CostModel
from ..contract.ir import Plan, validate_plan
from ..contract.shapes import ChunkShape
from ..contract.units import format_bytes
from ..sim.simulator import SimResult, iteration_time, simulate
from .baselines import SEQ1F1B_SLICE_COUNTS, UNIFORM_SLICE_COUNTS, gpipe_schedule, uniform_faster_than
from .bound import MemoryBound, memory_lower_bound
from .compose import join_plans
from .grouping import CHECKPOINTING, PipelineCoster, group_pipelines
from .ilp import InfeasibleMemoryError, SolverCache, solve_checkpointing
from .packing import balanced_chunks, fixed_size_chunks, pack_whole
from .processor import process_sequences
from .request import PlanRequest
from .schedule import epp_schedule

PLANNER_NAMES = {"ilp": "epp", "none": "epp-no-ckpt", "full": "epp-full-ckpt"}
MIN_SLICE_TOKENS = 1024  # below this, slices waste the GPU; the search stops there
UNIFORM_MARGIN = 0.02  # a baseline chunking this close to the best also runs as the baseline would
SCREEN_CUTS = 3  # cut points a screened K may group at; enough to split off the longest sequences


class NoPlanError(ValueError):
    """No plan fits the budget: ``bound`` is what any plan needs (`memory_lower_bound`),
    ``closest_bytes`` the budget from which EPP plans the batch (`frugal_plan`'s peak; else the
    closest candidate's need, or None), ``metadata`` the search's record for ``--explain``."""

    def __init__(self, message: str, bound: MemoryBound, closest_bytes: float | None = None,
                 metadata: dict[str, Any] | None = None):
        super().__init__(message)
        self.bound, self.closest_bytes, self.metadata = bound, closest_bytes, dict(metadata or {})

    @property
    def need_bytes(self) -> float:
        """The budget to ask for: ``closest_bytes`` where known, else the bound."""
        return self.bound.bytes if self.closest_bytes is None else self.closest_bytes

    def __reduce__(self):
        """Rebuilt from its fields, so it survives the planning process's pickling."""
        return type(self), (str(self), self.bound, self.closest_bytes, self.metadata)


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
                shape, n, n if full_recompute else 0, first, is_last) + cost.dkv_bytes(shape, n)
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


def convex_floor(points: list[tuple[float, float]], x: float) -> float:
    """The least a convex curve through ``points`` (sorted by x) can be at ``x``, or, for ``x``
    past the last point, anywhere from there to ``x``; -inf where the points do not say.

    A line through two neighbouring points, extended beyond them, lies below the curve: the
    nearest pair on each side of ``x`` bounds it."""
    xs = [p[0] for p in points]
    j = bisect.bisect_left(xs, x)  # points[:j] lie left of x
    floor = -math.inf
    if j >= 2:
        (x0, y0), (x1, y1) = points[j - 2], points[j - 1]
        slope = (y1 - y0) / (x1 - x0)
        floor = y1 + (min(slope, 0.0) if j == len(points) else slope) * (x - x1)
    if len(points) - j >= 2 and x < xs[j]:
        (x0, y0), (x1, y1) = points[j], points[j + 1]
        floor = max(floor, y0 + (y1 - y0) / (x1 - x0) * (x - x0))
    return floor


def slice_count_ladder(lo: int, hi: int) -> list[int]:
    """Roughly geometric candidates in ``[lo, hi]`` (ratio ~1.5), both ends included."""
    out, k = [lo], lo
    while k < hi:
        k = min(hi, max(k + 1, round(k * 1.5)))
        out.append(k)
    return out


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way of cutting the batch into chunks that the search plans, checkpoints and simulates.

    ``epp``: Algorithm 1 with ``size`` = K equal-time slices of the longest sequence and chunks
    of at most ``token_capacity`` tokens; ``fixed``: every sequence cut at ``size`` tokens, short
    ones packed (the ``seq1f1b`` and ``epp-uniform`` family); ``balanced``: Seq1F1B's own
    equal-compute partition into ``size`` slices; ``whole``: whole sequences packed into chunks
    of at most ``size`` tokens (the ``batch-1f1b`` family).
    """

    family: Literal["epp", "fixed", "balanced", "whole", "composite", "frugal"]
    size: int
    token_capacity: int = 0
    interleave: bool = False

    @property
    def label(self) -> str:
        return self._label + (" interleaved" if self.interleave else "")

    @property
    def _label(self) -> str:
        if self.family == "epp":
            return f"epp K={self.size} cap={self.token_capacity}"
        if self.family == "balanced":
            return f"balanced {self.size} slices"
        if self.family == "composite":
            return f"{self.size} longest alone + rest"
        if self.family == "frugal":
            return "frugal (least memory)"
        return f"{self.family} {self.size} tokens"


@dataclasses.dataclass
class _Trial:
    candidate: Candidate
    screened: bool
    plan: Plan | None
    sim: SimResult | None
    error: str = ""
    seconds: float = 0.0
    memory_error: InfeasibleMemoryError | None = None
    largest_chunk: int = 0

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
        c = self.candidate
        out: dict[str, Any] = {"candidate": c.label, "family": c.family, "size": c.size,
                               "token_capacity": c.token_capacity, "screened": self.screened,
                               "feasible": self.feasible, "planning_s": round(self.seconds, 4)}
        if self.sim is not None:
            out["iteration_time_s"] = self.sim.iteration_time_s
            out["bubble_ratio"] = self.sim.bubble_ratio
            out["recompute_s"] = self.sim.recompute_time_s
            out["num_chunks"] = self.sim.num_chunks
            out["num_pipelines"] = self.sim.num_pipelines
            if not self.sim.feasible:
                out["error"] = "; ".join(str(o) for o in self.sim.oom)
        if self.plan is not None and "checkpointing_kind" in self.plan.metadata:
            out["checkpointing_kind"] = self.plan.metadata["checkpointing_kind"]
        if self.error:
            out["error"] = self.error
        return out


def plan_epp(request: PlanRequest, checkpointing: Literal["ilp", "none", "full"] = "ilp") -> Plan:
    """Plan one global batch with EPP; ``checkpointing`` selects the ILP or an ablation.

    The search screens candidate chunkings as one pipeline (grouping only where one pipeline
    cannot fit) with a loose ILP gap: Algorithm 1 over a ladder of slice counts K, each retried
    with a smaller token capacity when a stage's window cannot hold its chunks, and (with the
    ILP) the fixed-granularity chunkings of the baselines, so their plans are in EPP's search
    space. The best ``refine_top`` candidates then get the full pipeline-grouping DP, and the
    winner's checkpointing is re-solved at ``mip_gap`` where its LP bound leaves room for a gain
    of more than ``mip_gap`` of the iteration; every trial is a complete simulated plan and the
    fastest that fits wins (knobs: `PlannerOptions`). ``metadata["search"]`` lists every
    trial, which ``infinipipe plan --explain`` prints. Raises ``ValueError`` when nothing fits
    with checkpointing (naming the closest attempt and why); the ``none`` ablation returns its
    closest plan flagged ``metadata["feasible"] = False``.
    """
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {checkpointing!r}")
    with _cyclic_gc_paused():  # the search is freed on return, before the collector resumes
        return _plan_epp(request, checkpointing)


def _plan_epp(request: PlanRequest, checkpointing: str, compose: bool = True) -> Plan:
    """``compose``: the search may also plan the batch in parts (`_Search.composite`); the parts'
    own searches may not, so parts never nest."""
    started = time.perf_counter()
    memory = float(request.memory_budget)
    name = PLANNER_NAMES[checkpointing]
    bound = memory_lower_bound(request.cost, request.layers, request.lengths)
    if checkpointing != "none" and memory < bound.bytes:
        frugal = max(simulate(frugal_plan(request), request.cost).peak_memory_bytes)
        raise NoPlanError(f"{name}: no plan of this batch fits {format_bytes(memory)} per device: {bound}; "
                          f"{name} plans it from {format_bytes(frugal)} ({frugal / bound.bytes:.2f}x the bound)",
                          bound, frugal, metadata={"planner": name, "memory_lower_bound": bound.bytes, "search": []})
    search = _Search(request, checkpointing, compose)
    fixed = request.options.num_slices
    if fixed is not None:
        best = search.trial(Candidate("epp", fixed, search.token_capacity), screen=False)
    else:
        best = search.run()
    meta = {
        "planner": name,
        "memory_budget": memory,
        "memory_lower_bound": bound.bytes,
        "search": [t.summary() for t in search.trials.values()],
        "search_skipped": search.skipped,
    }
    if best.plan is None or (checkpointing != "none" and not best.feasible):
        tried = sorted({t.candidate.size for t in search.trials.values() if t.candidate.family == "epp"})
        frugal = search.trials.get((Candidate("frugal", 0), False))
        nearest = frugal if frugal is not None and frugal.memory_error is not None else search.nearest()
        if nearest is None:
            need, closest = f"; closest: {best.candidate.label}: {best.error or best.sim.oom[0]}", None
        else:
            closest = nearest.memory_error.min_memory_bytes
            need = (f"; {name} plans it from {format_bytes(closest)} ({closest / bound.bytes:.2f}x the bound: "
                    f"{nearest.candidate.label} with every layer recomputed)")
        raise NoPlanError(
            f"{name}: no candidate fits {format_bytes(memory)} per device (tried K = {tried} and "
            f"{len(search.trials)} plans in all): {bound}{need}", bound, closest, meta)
    validate_plan(best.plan)  # trials skip validation; the plan handed on must pass it
    meta = {
        **best.plan.metadata,
        **meta,
        "feasible": best.feasible,
        "iteration_time_s": best.sim.iteration_time_s,
        "chosen": best.candidate.label,
        "planning_time_s": time.perf_counter() - started,
    }
    return dataclasses.replace(best.plan, metadata=meta)


FRUGAL_SLICE_TOKENS = 256  # the frugal plan's slices: small enough that their transients are a rounding error


def frugal_plan(request: PlanRequest) -> Plan:
    """The plan of the batch that needs the least memory among those EPP's search tries, with
    every layer recomputed: each sequence of at least half the longest's length alone in a
    pipeline, the rest in one more, each part cut into equal slices (no chunk then holds more
    tokens, so no action's transient is larger) and packed at that size; each part's slice count
    (powers of two up to ``max_slices``, no slice under FRUGAL_SLICE_TOKENS tokens, or none at
    all) is the one with its lowest peak (more slices hold fewer tokens at a time, but where
    attention needs an explicit mask each one's mask over its prefix grows, and a whole sequence
    needs no K/V store). Its peak depends on the batch, not the budget: from it on, EPP plans."""
    lengths, layers = request.lengths, request.layers
    best: dict[tuple[int, ...], Plan] = {}
    parts = alone_and_rest(lengths, lambda n: 2 * n >= max(lengths))
    for part in parts:
        sub = tuple(lengths[i] for i in part)
        if sub in best:
            continue
        top = min(request.options.max_slices, max(1, max(sub) // FRUGAL_SLICE_TOKENS))
        plans = [epp_schedule(chunks, sub, len(layers), layers, recompute=lambda s, _c: layers[s], validate=False)
                 for chunks in (fixed_size_chunks(sub, -(-max(sub) // k))
                                for k in sorted({*(2**i for i in range(top.bit_length())), top}))]
        peaks = [max(simulate(p, request.cost).peak_memory_bytes) for p in plans]
        best[sub] = plans[peaks.index(min(peaks))]
    return join_plans([(best[tuple(lengths[i] for i in p)], p) for p in parts], lengths,
                      {"chunking": "frugal", "parts": len(parts), "screened": False})


def alone_and_rest(lengths: Sequence[int], alone: Callable[[int], bool]) -> list[list[int]]:
    """Each sequence whose length ``alone`` picks as a part of its own, then the rest as one."""
    rest = [i for i, n in enumerate(lengths) if not alone(n)]
    return [[i] for i, n in enumerate(lengths) if alone(n)] + ([rest] if rest else [])


def plan_in_parts(request: PlanRequest, parts: list[list[int]], checkpointing: str = "ilp") -> Plan:
    """The batch's sequences ``parts`` (lists of indices covering it) each planned by an EPP
    search of its own, at the request's budget, and joined as back-to-back pipelines (parts of
    equal lengths are planned once). Raises `NoPlanError` for the neediest part that has no plan,
    with its ``closest_bytes`` (the budget from which the whole would fit, as far as the parts'
    searches say)."""
    planned: dict[tuple[int, ...], Plan] = {}
    failed: list[tuple[float, int, NoPlanError]] = []
    for part in parts:
        lengths = tuple(request.lengths[i] for i in part)
        if lengths in planned:
            continue
        try:
            planned[lengths] = _plan_epp(dataclasses.replace(request, lengths=lengths), checkpointing, compose=False)
        except NoPlanError as exc:
            failed.append((exc.need_bytes, len(part), exc))
    if failed:
        need, count, exc = max(failed, key=lambda f: f[0])
        raise NoPlanError(f"the part of {count} sequence(s) has no plan: {exc}", exc.bound, need, exc.metadata)
    return join_plans([(planned[tuple(request.lengths[i] for i in p)], p) for p in parts], request.lengths,
                      {"planner": PLANNER_NAMES[checkpointing], "memory_budget": float(request.memory_budget),
                       "chunking": "composite", "parts": len(parts), "screened": False})


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """The search allocates about a million acyclic objects (actions, intervals, chunks), which
    reference counting frees; the cyclic collector's passes over the live ones found nothing to
    free and took a quarter of the planning time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Search:
    def __init__(self, request: PlanRequest, checkpointing: str, compose: bool = True):
        self.request, self.checkpointing, self.compose = request, checkpointing, compose
        self.options = opts = request.options
        self.cost, self.layers = request.cost, tuple(request.layers)
        self.memory = float(request.memory_budget)
        self.lengths = list(request.lengths)
        self.longest = max(self.lengths)
        self.token_capacity = opts.token_capacity or token_capacity(
            self.cost, self.layers, self.memory, self.longest, full_recompute=checkpointing != "none")
        self.screen_gap = max(opts.mip_gap, opts.screen_gap)
        # A searched plan is checkpointed at the screening gap and only the winner tightened; a
        # fixed K's one plan is the answer.
        self.plan_gap = self.screen_gap if opts.num_slices is None else opts.mip_gap
        self.cache = SolverCache()
        self.trials: dict[tuple[Candidate, bool], _Trial] = {}
        self.chunkings: dict[Candidate, list] = {}  # a full trial re-plans a screened candidate's chunks
        self.uniform_tried: set[Candidate] = set()
        self.skipped: list[dict[str, Any]] = []  # slice counts the K ladder's convex floor left out

    def trial(self, cand: Candidate, screen: bool, regroup: bool = True) -> _Trial:
        if (cand, screen) not in self.trials:
            t0 = time.perf_counter()
            self.trials[(cand, screen)] = self._plan_for(cand, screen, regroup)
            self.trials[(cand, screen)].seconds = time.perf_counter() - t0
        return self.trials[(cand, screen)]

    def _chunks(self, cand: Candidate) -> list:
        cand = dataclasses.replace(cand, interleave=False)  # the order does not change the chunks
        if cand not in self.chunkings:
            self.chunkings[cand] = self._chunking(cand)
        return self.chunkings[cand]

    def _chunking(self, cand: Candidate) -> list:
        if cand.family == "epp":
            return process_sequences(self.lengths, self.cost, cand.size, cand.token_capacity)
        if cand.family == "fixed":
            return fixed_size_chunks(self.lengths, cand.size)
        if cand.family == "balanced":
            return balanced_chunks(self.lengths, self.cost, cand.size)
        return pack_whole(self.lengths, cand.size)

    def _plan_for(self, cand: Candidate, screen: bool, regroup: bool) -> _Trial:
        """Plan, checkpoint and simulate one candidate. Screening groups into one pipeline, or
        (with ``regroup``) two where one cannot fit; a full trial runs the whole grouping DP."""
        cost, layers, memory = self.cost, self.layers, self.memory
        try:
            chunks = self._chunks(cand)
        except ValueError as exc:
            return _Trial(cand, screen, None, None, str(exc))
        leader = self.leader()
        if screen and leader is not None:
            # Recompute only adds time: one pipeline with none at all bounds what this
            # candidate's screen can reach, so one already slower than the leader skips the ILP.
            bare = [epp_schedule(chunks, self.lengths, len(layers), layers, validate=False, interleave=cand.interleave)]
            if cand.family == "whole":  # the baseline may also run these chunks in GPipe's order
                bare.append(gpipe_schedule(chunks, self.lengths, layers, {}))
            bound = min(iteration_time(p, cost, self.request.link) for p in bare)
            if bound >= leader.sim.iteration_time_s:
                return _Trial(cand, screen, None, None, f"pruned: {bound:.2f} s without any recompute is no faster "
                                                        f"than {leader.candidate.label} ({leader.sim.iteration_time_s:.2f} s)")
        gap = self.screen_gap if screen else self.plan_gap
        # Groupings are compared on loose ILP answers; the chosen one's plan is solved at ``gap``.
        coster = PipelineCoster(chunks, self.lengths, cost, layers, memory, self.checkpointing,
                                self.cache, self.screen_gap, self.options.time_limit_s, cand.interleave)
        grouping = group_pipelines(coster, max_pipelines=1)
        if not screen:
            grouping = group_pipelines(coster, self.options.max_pipelines, self.options.max_cuts)
        elif regroup and not grouping.feasible:
            grouping = group_pipelines(coster, min(2, self.options.max_pipelines),
                                       min(SCREEN_CUTS, self.options.max_cuts))
        meta = {"planner": PLANNER_NAMES[self.checkpointing], "memory_budget": memory,
                "chunking": cand.family, "num_slices": cand.size if cand.family == "epp" else None,
                "chunk_tokens": cand.size if cand.family != "epp" else None,
                "token_capacity": cand.token_capacity or None, "grouping_cost_ms": grouping.cost_ms,
                "grouping_evaluated": grouping.evaluated, "screened": screen}
        full = (lambda s, _c: layers[s]) if self.checkpointing == "full" else None
        plan = epp_schedule(chunks, self.lengths, len(layers), layers, pipelines=grouping.pipelines,
                            recompute=full, metadata=meta, validate=False, interleave=cand.interleave)
        trial = _Trial(cand, screen, None, None)
        if self.checkpointing == "ilp":
            try:
                plan = solve_checkpointing(plan, cost, memory, gap, self.options.time_limit_s, cache=self.cache)
            except InfeasibleMemoryError as exc:
                trial = _Trial(cand, screen, None, None, str(exc), memory_error=exc,
                               largest_chunk=max(c.tokens for c in chunks))
        if trial.memory_error is None:
            trial = _Trial(cand, screen, plan, simulate(plan, cost, memory, self.request.link))
        # The uniform variant runs one pipeline, as the screen did: once per candidate suffices.
        if (cand.family != "epp" and self.checkpointing == "ilp" and not cand.interleave and cand not in self.uniform_tried
                and (leader is None or not trial.feasible
                     or trial.sim.iteration_time_s <= leader.sim.iteration_time_s * (1 + UNIFORM_MARGIN))):
            trial = self._as_baseline(trial, chunks, meta)
        return trial

    def _as_baseline(self, trial: _Trial, chunks: list, meta: dict) -> _Trial:
        """A baseline's chunking also as the baseline itself runs it (uniform recompute; GPipe's
        order for whole sequences): on the simulator the ILP's answer usually wins, but keeping
        the better of the two makes EPP never slower than that baseline. Only chunkings whose
        ILP plan comes within UNIFORM_MARGIN of the leader (or does not fit) try it: the ILP's
        answer is rarely beaten at all, and never by that much."""
        self.uniform_tried.add(trial.candidate)
        meta = {**meta, "checkpointing_kind": "uniform"}
        request = self.request
        bases = [epp_schedule(chunks, request.lengths, request.num_stages, request.layers, metadata=meta, validate=False)]
        if trial.candidate.family == "whole":
            bases.append(gpipe_schedule(chunks, request.lengths, request.layers, meta))
        for base in bases:
            found = uniform_faster_than(request, base, trial.sim.iteration_time_s if trial.feasible else math.inf)
            if found is not None:
                trial = _Trial(trial.candidate, trial.screened, *found)
        return trial

    def _epp_trial(self, k: int, retry: bool) -> _Trial:
        """Algorithm 1 at K slices. With ``retry``, where a stage's window cannot hold the chunks
        even with full recompute, the token capacity halves below the largest chunk (twice at
        most, never below twice MIN_SLICE_TOKENS), so both packed chunks and slices shrink: the
        token threshold a window can hold is searched jointly with K. A retry screens one pipeline
        only: smaller chunks, not more pipelines, are what it tries."""
        cap = self.token_capacity
        trial = self.trial(Candidate("epp", k, cap), True)
        for _ in range(2 if retry and self.checkpointing != "none" else 0):
            if trial.memory_error is None or trial.largest_chunk // 2 < 2 * MIN_SLICE_TOKENS:
                break
            cap = trial.largest_chunk // 2
            trial = self.trial(Candidate("epp", k, cap), True, regroup=False)
        return trial

    def nearest(self) -> _Trial | None:
        """The candidate refused for memory that needs the smallest budget with every layer
        recomputed (None if none was refused for memory)."""
        refused = [t for t in self.trials.values() if t.memory_error is not None]
        return min(refused, key=lambda t: t.memory_error.min_memory_bytes) if refused else None

    def composite(self) -> None:
        """The batch in parts, each planned by a search of its own and run back to back: the
        sequences at the longest's length (the context cap of a truncated corpus), and again
        every sequence of at least half that length, each alone, the rest together. A long
        sequence then holds the only K/V store of its pipeline and no short work waits in its
        window, and each part gets the chunking that suits it. Tried where two or more such
        sequences share the batch, or where nothing else fits; parts of equal lengths are planned
        once."""
        if not self.compose or self.checkpointing != "ilp" or len(self.lengths) < 2:
            return
        capped = alone_and_rest(self.lengths, lambda n: n == self.longest)
        half = alone_and_rest(self.lengths, lambda n: 2 * n >= self.longest)
        for parts in (capped, half) if half != capped else (half,):
            alone = sum(len(p) == 1 and 2 * self.lengths[p[0]] >= self.longest for p in parts)
            if alone < 2 and self.leader() is not None:
                continue
            t0 = time.perf_counter()
            cand = Candidate("composite", alone)
            try:
                plan = plan_in_parts(self.request, parts, self.checkpointing)
            except NoPlanError as exc:
                trial = _Trial(cand, False, None, None, str(exc),
                               memory_error=InfeasibleMemoryError(exc.bound.stage, (), exc.need_bytes, self.memory))
            else:
                trial = _Trial(cand, False, plan, simulate(plan, self.cost, self.memory, self.request.link))
            trial.seconds = time.perf_counter() - t0
            self.trials[(cand, False)] = trial

    def frugal(self) -> None:
        """`frugal_plan`, checkpointed by the ILP (or left at full recompute by that ablation):
        tried where nothing else fits, so that every budget from its peak on has a plan."""
        t0 = time.perf_counter()
        cand = Candidate("frugal", 0)
        plan = frugal_plan(self.request)
        plan = dataclasses.replace(plan, metadata={**plan.metadata, "planner": PLANNER_NAMES[self.checkpointing],
                                                   "memory_budget": self.memory})
        trial = _Trial(cand, False, plan, simulate(plan, self.cost, self.memory, self.request.link))
        need = max(trial.sim.peak_memory_bytes)
        if need > self.memory:
            trial = _Trial(cand, False, None, None, f"needs {format_bytes(need)} with every layer recomputed",
                           memory_error=InfeasibleMemoryError(int(max(range(len(self.layers)),
                                                                      key=trial.sim.peak_memory_bytes.__getitem__)),
                                                              (), need, self.memory))
        elif self.checkpointing == "ilp":  # full recompute fits: the ILP has an answer, at most as slow
            plan = solve_checkpointing(plan, self.cost, self.memory, self.plan_gap, self.options.time_limit_s,
                                       cache=self.cache)
            trial = _Trial(cand, False, plan, simulate(plan, self.cost, self.memory, self.request.link))
        trial.seconds = time.perf_counter() - t0
        self.trials[(cand, False)] = trial

    def leader(self) -> _Trial | None:
        """The fastest fitting trial so far."""
        fits = [t for t in self.trials.values() if t.feasible]
        return min(fits, key=lambda t: t.score()) if fits else None

    def _out_of_reach(self, ladder: dict[int, _Trial], k: int, what: str) -> bool:
        """Whether the slice count ``k`` (past the ladder's last rung: every count up to ``k``)
        cannot beat the leader, with the screened time taken as convex in log K (`convex_floor`):
        the ladder's times are close to unimodal, and its largest rungs cost the most. A count
        left out is recorded, as ``what``, for ``--explain``."""
        leader = self.leader()
        points = sorted((math.log(size), t.sim.iteration_time_s) for size, t in ladder.items() if t.feasible)
        floor = convex_floor(points, math.log(k))
        if leader is None or floor < leader.sim.iteration_time_s:
            return False
        self.skipped.append({"candidate": what, "floor_s": floor, "leader": leader.candidate.label,
                             "leader_s": leader.sim.iteration_time_s})
        return True

    def _baseline_ladders(self) -> list[list[Candidate]]:
        """Every baseline's chunkings, screened with the ILP's checkpointing so their plans lie in
        EPP's search space: Seq1F1B's equal-compute slice counts, from the fewest up; whole
        sequences packed; fixed token sizes, Seq1F1B's powers of two and epp-uniform's
        ``longest / K`` each from the largest down."""
        top = max(math.ceil(math.log2(self.longest)), 11)
        powers = {min(2**k, self.longest) for k in range(11, top + 1)}
        uniform = {-(-self.longest // k) for k in UNIFORM_SLICE_COUNTS if k <= self.longest}
        # Powers of two and longest / K are two ladders: interleaved, an odd size that packs
        # badly between two good powers would end the ladder before the second.
        return [
            [Candidate("balanced", n) for n in SEQ1F1B_SLICE_COUNTS if n == 2 or self.longest // n >= 1024],
            [Candidate("whole", self.longest)],
            [Candidate("fixed", n) for n in sorted(powers - {self.longest}, reverse=True)],
            [Candidate("fixed", n) for n in sorted(uniform - powers - {self.longest}, reverse=True)],
        ]

    def _screen_ladders(self, ladders: list[list[Candidate]]) -> None:
        """A ladder stops at its first step that does not gain (its plans' times are close to
        unimodal in the size), or where `_plan_for`'s bound prunes."""
        for ladder in ladders:
            previous = math.inf
            for cand in ladder:
                trial = self.trial(cand, True)
                if trial.feasible:
                    if trial.sim.iteration_time_s >= previous:
                        break
                    previous = trial.sim.iteration_time_s
                elif previous < math.inf:
                    break

    def run(self) -> _Trial:
        """Screen the K ladder (bisecting towards the best rung) and the baselines' chunkings,
        give the top few the full grouping search, then tighten the winner's checkpointing. The
        K ladder stops, and a bisection point is skipped, where `convex_floor` of its screened
        times says no slice count there can beat the leader."""
        # Slices under MIN_SLICE_TOKENS waste the device, but one cut is always worth a look:
        # the simulator, not the heuristic, says whether it pays.
        hi = max(1, min(self.options.max_slices, self.longest, max(2, self.longest // MIN_SLICE_TOKENS)))
        lo = min(hi, self.options.min_slices)
        tried = sorted(set(slice_count_ladder(lo, hi)))
        families = self._baseline_ladders() if self.checkpointing == "ilp" else []
        self._screen_ladders(families[:1])  # a strong leader early lets the bound skip more ILPs
        # Capacity is searched only while memory, not the slice count, ends the ladder early.
        best: dict[int, _Trial] = {}
        for i, k in enumerate(tried):  # a wall in the ladder is probed with smaller chunks once
            best[k] = self._epp_trial(k, retry=i > 0 and best[tried[i - 1]].feasible)
            if k < hi and best[k].feasible and self._out_of_reach(best, hi, f"epp K={tried[i + 1]}..{hi}"):
                tried = tried[:i + 1]
                break
        for _ in range(self.options.refine_rounds):
            k_best = min(tried, key=lambda k: best[k].score())
            i = tried.index(k_best)
            new = {(k_best + n) // 2 for n in (tried[max(i - 1, 0)], tried[min(i + 1, len(tried) - 1)])} - set(tried)
            new = {k for k in sorted(new) if not self._out_of_reach(best, k, f"epp K={k}")}
            if not new:
                break
            best.update({k: self._epp_trial(k, retry=False) for k in new})
            tried = sorted(set(tried) | new)
        self._screen_ladders(families[1:])
        screened = sorted((t for (_, screen), t in self.trials.items() if screen and t.plan is not None),
                          key=lambda t: t.score())
        for t in screened[:self.options.refine_top]:
            self.trial(t.candidate, False)
            if self.checkpointing == "ilp" and t.sim.recompute_time_s > 0:
                # Where memory binds, the same chunks with short work between the split
                # sequences (their stores apart, the short work in their window) may need less.
                self.trial(dataclasses.replace(t.candidate, interleave=True), False)
        # A slice count whose one or two pipelines cannot fit even with full recompute may fit
        # as more pipelines: the closest such screen gets the grouping search too, as the
        # full-recompute ablation's best screen does.
        blocked = [t for (c, screen), t in self.trials.items()
                   if screen and c.family == "epp" and t.memory_error is not None]
        if blocked:
            self.trial(min(blocked, key=lambda t: t.memory_error.min_memory_bytes).candidate, False)
        self.composite()
        if self.leader() is None and self.checkpointing != "none":
            self.frugal()
        return self.tighten(min(self.trials.values(), key=lambda t: t.score()))

    def tighten(self, trial: _Trial) -> _Trial:
        """Re-solve the winner's checkpointing at ``mip_gap`` (trials solve it at the screening
        gap); keep the answer if it simulates faster.

        Only where that could pay: the winner's distance from its LP bound is the most recompute
        delay an exact answer could save, by the ILP's own measure. Below ``mip_gap`` of the
        iteration the branch and bound (most of a second for a few hundred chunks, a third of all
        planning) gained under 0.1% of the iteration on the benchmark batches."""
        gap = self.options.mip_gap
        ckpt = trial.plan.metadata.get("checkpointing") if trial.plan is not None else None
        if (ckpt is None  # no ILP answer: uniform recompute won, or an ablation
                or ckpt["mip_gap"] <= gap
                or (ckpt["objective_ms"] - ckpt["lp_bound_ms"]) / 1e3 <= gap * trial.sim.iteration_time_s):
            return trial
        plan = solve_checkpointing(trial.plan, self.cost, self.memory, gap, self.options.time_limit_s, cache=self.cache)
        plan = dataclasses.replace(plan, metadata={**plan.metadata, "screened": False})
        tight = _Trial(trial.candidate, False, plan, simulate(plan, self.cost, self.memory, self.request.link))
        if tight.score() < trial.score():  # recorded in place of the full trial it improves on
            self.trials[(trial.candidate, False)] = tight
        else:
            self.trials.setdefault((trial.candidate, False), tight)
        return min((tight, trial), key=lambda t: t.score())
