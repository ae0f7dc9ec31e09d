"""How EPP's search plans one candidate and keeps the record of what it planned.

A candidate (a chunking: EPP's Algorithm 1 at some K, or a baseline's) is planned once, screened
(one pipeline, loose ILP gap) or in full (the grouping DP), here or on a pool's worker, and judged
against the search's leaders as they stand: pruned where its recompute-free pipeline is already
no faster than the best screen, run also as its baseline would (uniform recompute) where that
could matter. `TrialBook` holds the trials, the deadline's bookkeeping (seconds per chunk of each
kind of trial) and the pool's prefetching; the strategy that decides what to plan next is
`epp._Search`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import Any

from ..contract.cost import CostModel
from ..contract.shapes import ChunkShape
from ..sim.simulator import iteration_time, simulate
from .baselines import gpipe_schedule, uniform_faster_than
from .candidates import Candidate, Trial
from .deadline import Deadline
from .grouping import PipelineCoster, group_pipelines
from .ilp import solve_checkpointing
from .ilp_problem import InfeasibleMemoryError, SolverCache
from .packing import balanced_chunks, fixed_size_chunks, pack_whole
from .processor import process_sequences
from .request import PlanRequest
from .schedule import Order, epp_schedule
from .search_pool import SearchPool

PLANNER_NAMES = {"ilp": "epp", "none": "epp-no-ckpt", "full": "epp-full-ckpt"}
UNIFORM_MARGIN = 0.02  # a baseline chunking this close to the best also runs as the baseline would
SCREEN_CUTS = 3  # cut points a screened K may group at; enough to split off the longest sequences
FULL_TRIAL_SCREENS = 3  # a full trial's grouping search costs about this many screens of its chunks


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


@dataclasses.dataclass
class _Outcome:
    """A candidate planned where the search's leader is not known (a pool's worker): the trial,
    the time its one pipeline needs without recompute (screens), and the baseline's own run of
    its chunks (`TrialBook._uniform_of`), for the search to weigh as the one-process search would."""

    trial: Trial
    bare_s: float | None = None
    uniform: Trial | None = None


_WORKER_SEARCHES: dict[str, "TrialBook"] = {}
WORKER_SEARCHES_KEPT = 4  # a worker keeps this many searches' chunkings and ILP answers


def _outcome_in_worker(key: str, request: PlanRequest, checkpointing: str, cand: Candidate, screen: bool,
                       regroup: bool, prune_s: float | None, uniform_s: float | None,
                       stop_at: float | None) -> _Outcome:
    """A pool worker's job: plan one candidate of the search ``key`` (made on its first job)."""
    search = _WORKER_SEARCHES.pop(key, None) or TrialBook(request, checkpointing, compose=False)
    _WORKER_SEARCHES[key] = search
    while len(_WORKER_SEARCHES) > WORKER_SEARCHES_KEPT:
        del _WORKER_SEARCHES[next(iter(_WORKER_SEARCHES))]
    with _cyclic_gc_paused():
        return search.outcome(cand, screen, regroup, prune_s, uniform_s, stop_at)


def _lean(trial: Trial | None) -> Trial | None:
    """The trial without its simulation's timeline, which the search never reads: what a
    worker sends back."""
    if trial is None or trial.sim is None:
        return trial
    return dataclasses.replace(trial, sim=dataclasses.replace(trial.sim, intervals=(), memory_timeline=()))


class TrialBook:
    """The trials of one search: each candidate planned once (here or on the pool), the deadline's
    record of how long trials of each kind took, and the leaders they are judged against."""

    def __init__(self, request: PlanRequest, checkpointing: str, compose: bool = True,
                 deadline: Deadline | None = None, pool: SearchPool | None = None):
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
        self.trials: dict[tuple[Candidate, bool], Trial] = {}
        self.chunkings: dict[Candidate, list] = {}  # a full trial re-plans a screened candidate's chunks
        self.uniform_tried: set[Candidate] = set()
        self.skipped: list[dict[str, Any]] = []  # slice counts the K ladder's convex floor left out
        self.deadline = deadline or Deadline(time.monotonic())
        self.skipped_for_time: list[str] = []
        self.work: dict[bool, list[float]] = {True: [0.0, 0], False: [0.0, 0]}  # screens', full trials': seconds, chunks
        self.pool = pool
        self.key = uuid.uuid4().hex
        self.prefetched: dict[tuple[Candidate, bool], Future] = {}
        self.queued: list[tuple[Candidate, bool]] = []  # prefetched, not yet submitted

    def trial(self, cand: Candidate, screen: bool, regroup: bool = True) -> Trial:
        """``cand`` planned (screened or in full), once; once a plan fits, a candidate not
        planned yet whose planning would end past the deadline is skipped (an error trial, not
        recorded)."""
        if (cand, screen) not in self.trials:
            future = self.prefetched.pop((cand, screen), None)
            if (cand, screen) in self.queued:
                self.queued.remove((cand, screen))
            if (future is None or not future.done()) and self.out_of_time(screen, cand):
                if future is not None:
                    future.cancel()
                self.skipped_for_time.append(cand.label + ("" if screen else " (full)"))
                return Trial(cand, screen, None, None, "skipped: past the planning deadline")
            t0 = time.perf_counter()
            if self.pool is not None:
                if future is None:
                    future = self._submit(cand, screen, regroup)
                    self._pump()
                trial = self._weigh(cand, screen, future.result())
                self._pump()
            else:
                trial = self._plan_for(cand, screen, regroup)
                trial.seconds = time.perf_counter() - t0
            self.trials[(cand, screen)] = trial
            if self.deadline.active:
                self.work[screen][0] += trial.seconds
                self.work[screen][1] += self._chunk_count(cand)
        return self.trials[(cand, screen)]

    def _chunk_count(self, cand: Candidate | None) -> int:
        if cand is None or cand.family in ("composite", "frugal"):
            return 0
        try:
            return len(self._chunks(cand))
        except ValueError:
            return 0

    def out_of_time(self, screen: bool, cand: Candidate | None = None) -> bool:
        """Whether planning ``cand`` would end past the deadline, at the seconds per chunk that
        trials of its kind took so far (a full trial's grouping search: FULL_TRIAL_SCREENS
        screens' worth until one was timed); never before some plan fits."""
        stop_at = self._stop_at()
        if stop_at is None:
            return False
        seconds, done = self.work[screen]
        if not done and not screen:
            seconds, done = self.work[True][0] * FULL_TRIAL_SCREENS, self.work[True][1]
        estimate = seconds / done * self._chunk_count(cand) if done else 0.0
        return time.monotonic() + estimate > stop_at

    def _stop_at(self) -> float | None:
        """When nothing new starts and a grouping search stops costing new groups: the
        deadline, once it binds (None before)."""
        leader = self.leader()
        if leader is None and not self.deadline.strict:
            return None
        return self.deadline.limit(leader.sim.iteration_time_s if leader else None)

    def prefetch(self, cands: Sequence[Candidate], screen: bool) -> None:
        """Queue the candidates the search will look at next for the pool (no-op without one)."""
        if self.pool is None:
            return
        for cand in cands:
            key = (cand, screen)
            if key not in self.trials and key not in self.prefetched and key not in self.queued:
                self.queued.append(key)
        self._pump()

    def _pump(self) -> None:
        """Submit queued candidates while fewer than the pool's size are in flight: answers the
        search may never read must not stand in the way of the ones it reads next."""
        while self.queued and sum(not f.done() for f in self.prefetched.values()) < self.pool.size:
            cand, screen = key = self.queued.pop(0)
            if key not in self.trials and key not in self.prefetched:
                self.prefetched[key] = self._submit(cand, screen, True)

    def cancel_prefetched(self) -> None:
        for future in self.prefetched.values():
            future.cancel()
        self.prefetched.clear()
        self.queued.clear()

    def _submit(self, cand: Candidate, screen: bool, regroup: bool) -> Future:
        """A worker plans the candidate, told what a result must beat to matter now."""
        return self.pool.submit(_outcome_in_worker, self.key, self.request, self.checkpointing, cand, screen, regroup,
                                *self._thresholds(cand, pooled=True))

    def _thresholds(self, cand: Candidate, pooled: bool) -> tuple[float | None, float | None, float | None]:
        """What planning ``cand`` needs to know of the leaders now (`outcome`): the best screen's
        time (None: nothing can prune it, planned here and now), the leader's for a baseline's own
        run (None: run already), and when the grouping search stops. Leaders only improve, so what
        these rule out stays ruled out when a pool's answer is read."""
        screened, leader = self.leader(screened=True), self.leader()
        prune_s = screened.sim.iteration_time_s if screened else (math.inf if pooled else None)
        uniform_s = None if cand in self.uniform_tried else (leader.sim.iteration_time_s if leader else math.inf)
        return prune_s, uniform_s, self._stop_at()

    def _weigh(self, cand: Candidate, screen: bool, outcome: _Outcome) -> Trial:
        """An outcome judged against this search's leaders now: pruned where its screen's bare time
        is no faster than the best screen, the baseline's own run where that is wanted."""
        screened, leader = self.leader(screened=True), self.leader()
        if screen and screened is not None and outcome.bare_s is not None:
            pruned = self._pruned(cand, outcome.bare_s, screened)
            if pruned is not None:
                return pruned
        if outcome.uniform is not None and self._wants_uniform(cand, outcome.trial, leader):
            self.uniform_tried.add(cand)
            return outcome.uniform
        return outcome.trial

    def outcome(self, cand: Candidate, screen: bool, regroup: bool, prune_s: float | None, uniform_s: float | None,
                stop_at: float | None) -> _Outcome:
        """Plan, checkpoint and simulate one candidate, given `_thresholds`. Screening groups into
        one pipeline, or (with ``regroup``) two where one cannot fit; a full trial runs the whole
        grouping DP. Recompute only adds time, so a screen whose one pipeline without any is
        already no faster than ``prune_s`` skips the ILP; the baseline's own run is skipped where
        the trial is more than UNIFORM_MARGIN behind ``uniform_s``."""
        t0 = time.perf_counter()
        try:
            chunks = self._chunks(cand)
        except ValueError as exc:
            return _Outcome(Trial(cand, screen, None, None, str(exc)))
        bare = self._bare_s(cand, chunks) if screen and prune_s is not None else None
        if bare is not None and bare >= prune_s:
            return _Outcome(Trial(cand, screen, None, None, "pruned"), bare)
        trial, meta = self._checkpointed(cand, chunks, screen, regroup, stop_at)
        uniform = None
        if (uniform_s is not None and self._uniform_applies(cand)
                and (not trial.feasible or trial.sim.iteration_time_s <= uniform_s * (1 + UNIFORM_MARGIN))):
            uniform = self._uniform_of(trial, chunks, meta)
        seconds = time.perf_counter() - t0
        for t in (trial, uniform):
            if t is not None:
                t.seconds = seconds
        return _Outcome(_lean(trial), bare, _lean(uniform))

    def _chunks(self, cand: Candidate) -> list:
        cand = dataclasses.replace(cand, order=Order())  # the order does not change the chunks
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

    def _plan_for(self, cand: Candidate, screen: bool, regroup: bool) -> Trial:
        """One candidate planned in this process, judged as a pool's answer is."""
        return self._weigh(cand, screen, self.outcome(cand, screen, regroup, *self._thresholds(cand, pooled=False)))

    def _bare_s(self, cand: Candidate, chunks: list) -> float:
        """The candidate's chunks as one pipeline without any recompute: a floor on its screen."""
        bare = [epp_schedule(chunks, self.lengths, len(self.layers), self.layers, validate=False,
                             order=cand.order, cost=self.cost, link=self.request.link)]
        if cand.family == "whole":  # the baseline may also run these chunks in GPipe's order
            bare.append(gpipe_schedule(chunks, self.lengths, self.layers, {}))
        return min(self._recompute_free_s(p) for p in bare)

    def _recompute_free_s(self, plan) -> float:
        """``plan``'s time with no recompute and nothing on the host: a floor on any checkpointed
        plan of its order (the optimizer state's copies, timed for another order or not yet
        planned, could only add to it)."""
        return iteration_time(plan, dataclasses.replace(self.cost, optimizer_on_host=False), self.request.link)

    @staticmethod
    def _pruned(cand: Candidate, bare_s: float, leader: Trial) -> Trial | None:
        if bare_s < leader.sim.iteration_time_s:
            return None
        return Trial(cand, True, None, None, f"pruned: {bare_s:.2f} s without any recompute is no faster "
                                             f"than {leader.candidate.label} ({leader.sim.iteration_time_s:.2f} s)")

    def _checkpointed(self, cand: Candidate, chunks: list, screen: bool, regroup: bool,
                      stop_at: float | None) -> tuple[Trial, dict]:
        """The candidate grouped, checkpointed and simulated; with the metadata its plans carry.
        Past ``stop_at`` (the deadline, once a plan fits) the grouping DP costs no new group."""
        cost, layers, memory = self.cost, self.layers, self.memory
        gap = self.screen_gap if screen else self.plan_gap
        # Groupings are compared on loose ILP answers; the chosen one's plan is solved at ``gap``.
        coster = PipelineCoster(chunks, self.lengths, cost, layers, memory, self.checkpointing,
                                self.cache, self.screen_gap, self.options.time_limit_s, cand.order)
        grouping = group_pipelines(coster, max_pipelines=1)
        if not screen:
            grouping = group_pipelines(coster, self.options.max_pipelines, self.options.max_cuts, stop_at)
        elif regroup and not grouping.feasible:
            grouping = group_pipelines(coster, min(2, self.options.max_pipelines),
                                       min(SCREEN_CUTS, self.options.max_cuts), stop_at)
        meta = {"planner": PLANNER_NAMES[self.checkpointing], "memory_budget": memory,
                "chunking": cand.family, "num_slices": cand.size if cand.family == "epp" else None,
                "chunk_tokens": cand.size if cand.family != "epp" else None,
                "token_capacity": cand.token_capacity or None, "grouping_cost_ms": grouping.cost_ms,
                "grouping_evaluated": grouping.evaluated, "screened": screen}
        full = (lambda s, _c: layers[s]) if self.checkpointing == "full" else None
        plan = epp_schedule(chunks, self.lengths, len(layers), layers, pipelines=grouping.pipelines,
                            recompute=full, metadata=meta, validate=False, order=cand.order, cost=cost,
                            link=self.request.link)
        if self.checkpointing == "ilp":
            try:
                plan = solve_checkpointing(plan, cost, memory, gap, self.options.time_limit_s, cache=self.cache)
            except InfeasibleMemoryError as exc:
                return Trial(cand, screen, None, None, str(exc), memory_error=exc,
                             largest_chunk=max(c.tokens for c in chunks)), meta
        return Trial(cand, screen, plan, simulate(plan, cost, memory, self.request.link)), meta

    def reordered(self, base: Trial, order: Order, hinted: bool = False) -> Trial:
        """``base``'s chunks and pipelines in another ``order``, checkpointed and simulated, recorded
        as a full trial of its candidate in that order; skipped (not recorded) past the deadline
        (unless ``hinted``: a warm start's winner is planned whatever the deadline) or where the
        order without any recompute is already no faster than the leader."""
        cand = dataclasses.replace(base.candidate, order=order)
        if (cand, False) in self.trials:
            return self.trials[(cand, False)]
        if not hinted and self.out_of_time(False, cand):
            self.skipped_for_time.append(cand.label)
            return Trial(cand, False, None, None, "skipped: past the planning deadline")
        t0 = time.perf_counter()
        old = base.plan
        # What the old order's checkpointing decided (recompute, when the optimizer state comes back) goes.
        meta = {k: v for k, v in old.metadata.items() if k not in ("checkpointing", "order", "optimizer_reload_lead",
                                                                 "optimizer_out_wait")}
        plan = epp_schedule(old.chunks, old.seq_lengths, old.num_stages, old.layers_per_stage, old.pipelines,
                            metadata=meta, validate=False, order=order, cost=self.cost, link=self.request.link)
        leader = self.leader()
        bare = self._recompute_free_s(plan)
        if leader is not None and bare >= leader.sim.iteration_time_s:
            trial = Trial(cand, False, None, None, f"pruned: {bare:.2f} s without any recompute is no faster "
                                                   f"than {leader.candidate.label} ({leader.sim.iteration_time_s:.2f} s)",
                          floor_s=bare)
        else:
            try:
                plan = solve_checkpointing(plan, self.cost, self.memory, self.plan_gap, self.options.time_limit_s,
                                           cache=self.cache)
                trial = Trial(cand, False, plan, simulate(plan, self.cost, self.memory, self.request.link))
            except InfeasibleMemoryError as exc:
                trial = Trial(cand, False, None, None, str(exc), memory_error=exc)
        trial.seconds = time.perf_counter() - t0
        self.trials[(cand, False)] = trial
        return trial

    def _uniform_applies(self, cand: Candidate) -> bool:
        """A baseline's chunking (one pipeline's order, as the screen ran it) under the ILP."""
        return cand.family != "epp" and self.checkpointing == "ilp" and cand.order.kind == "1f1b"

    def _wants_uniform(self, cand: Candidate, trial: Trial, leader: Trial | None) -> bool:
        """Once per candidate, where its ILP plan comes within UNIFORM_MARGIN of the leader or
        does not fit."""
        return (self._uniform_applies(cand) and cand not in self.uniform_tried
                and (leader is None or not trial.feasible
                     or trial.sim.iteration_time_s <= leader.sim.iteration_time_s * (1 + UNIFORM_MARGIN)))

    def _uniform_of(self, trial: Trial, chunks: list, meta: dict) -> Trial:
        """A baseline's chunking also as the baseline itself runs it (uniform recompute; GPipe's
        order for whole sequences): on the simulator the ILP's answer usually wins, but keeping
        the better of the two makes EPP never slower than that baseline. Only chunkings whose
        ILP plan comes within UNIFORM_MARGIN of the leader (or does not fit) try it: the ILP's
        answer is rarely beaten at all, and never by that much."""
        meta = {**meta, "checkpointing_kind": "uniform"}
        request = self.request
        bases = [epp_schedule(chunks, request.lengths, request.num_stages, request.layers, metadata=meta, validate=False)]
        if trial.candidate.family == "whole":
            bases.append(gpipe_schedule(chunks, request.lengths, request.layers, meta))
        for base in bases:
            found = uniform_faster_than(request, base, trial.sim.iteration_time_s if trial.feasible else math.inf)
            if found is not None:
                trial = Trial(trial.candidate, trial.screened, *found)
        return trial

    def nearest(self) -> Trial | None:
        """The candidate refused for memory that needs the smallest budget with every layer
        recomputed (None if none was refused for memory)."""
        refused = [t for t in self.trials.values() if t.memory_error is not None]
        return min(refused, key=lambda t: t.memory_error.min_memory_bytes) if refused else None

    def leader(self, screened: bool = False) -> Trial | None:
        """The fastest fitting trial so far (``screened``: of the screens). Screens are pruned,
        and the K ladder cut, against the best screen: a full trial planned early (a warm start,
        a deadline's early refinement) then changes only the order, not what is screened."""
        fits = [t for t in self.trials.values() if t.feasible and (t.screened or not screened)]
        return min(fits, key=lambda t: t.score()) if fits else None
