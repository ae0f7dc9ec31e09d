"""The ``epp`` planner: sequence processor + pipeline grouping + checkpointing ILP + slice-count search.

The slice count K (and with it the time and token thresholds of the processor) trades bubbles
and memory against kernel efficiency and per-chunk overhead. The paper picks K with a
closed-form estimate; here every candidate K is planned completely and run through the
simulator, whose iteration time is the objective. ILP answers are cached by problem digest, so
the grouping search and the final plan of each K solve every distinct pipeline once.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from ..contract.ir import Plan, validate_plan
from ..contract.units import format_bytes
from ..sim.host_schedule import optimizer_back_leads
from ..sim.simulator import simulate
from .baselines import UNIFORM_SLICE_COUNTS, seq1f1b_slice_counts
from .bound import MemoryBound, memory_lower_bound
from .candidates import Candidate, Trial, WarmStart
from .compose import join_plans
from .deadline import Deadline
from .grouping import CHECKPOINTING
from .ilp import solve_checkpointing
from .ilp_problem import InfeasibleMemoryError
from .packing import fixed_size_chunks
from .request import PlanRequest
from .schedule import Order, epp_schedule
from .search_pool import SearchPool, resolve_pool_size, shared_pool
from .search_trials import PLANNER_NAMES, TrialBook, _cyclic_gc_paused

MIN_SLICE_TOKENS = 1024  # below this, slices waste the GPU; the search stops there
RETIME_MARGIN = 0.01  # a timed order this far behind its 1F1B base at a little slack gets no slack grid
SLACK = 8  # more chunks in flight than 1F1B's warm-up, tried on the best lead
DEFER_CAPS = (1, 3, 5, 16)  # W actions a timed order's stage may leave pending at once


class OutOfTime(Exception):
    """A part's search reached its strict deadline without a plan (its parent has one)."""


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


def _plan_epp(request: PlanRequest, checkpointing: str, compose: bool = True, deadline: Deadline | None = None,
              pool: SearchPool | None = None) -> Plan:
    """``compose``: the search may also plan the batch in parts (`_Search.composite`); the parts'
    own searches may not, so parts never nest. A part's search gets its parent's ``deadline``
    and ``pool``; the whole batch's search makes them from the request's options."""
    started = time.perf_counter()
    if checkpointing == "ilp":  # the ILP decides what waits on the host; the ablations keep their own recompute
        request = request.with_host_tier()
    memory = float(request.memory_budget)
    name = PLANNER_NAMES[checkpointing]
    opts = request.options
    bound = memory_lower_bound(request.cost, request.layers, request.lengths)
    if checkpointing != "none" and memory < bound.bytes:
        frugal = max(simulate(frugal_plan(request), request.cost).peak_memory_bytes)
        raise NoPlanError(f"{name}: no plan of this batch fits {format_bytes(memory)} per device: {bound}; "
                          f"{name} plans it from {format_bytes(frugal)} ({frugal / bound.bytes:.2f}x the bound)",
                          bound, frugal, metadata={"planner": name, "memory_lower_bound": bound.bytes, "search": []})
    if deadline is None:
        deadline = Deadline.starting_now(opts.deadline_s, opts.deadline_share, request.step_s)
        pool = shared_pool(resolve_pool_size(opts.pool_size))
    search = _Search(request, checkpointing, compose, deadline, pool)
    fixed = opts.num_slices
    try:
        if fixed is not None:
            best = search.trial(Candidate("epp", fixed, search.token_capacity), screen=False)
        else:
            best = search.run()
    finally:
        search.cancel_prefetched()
    if best.plan is None and deadline.strict and search.skipped_for_time:
        raise OutOfTime(f"{name}: no plan before the deadline")
    meta = {
        "planner": name,
        "memory_budget": memory,
        "memory_lower_bound": bound.bytes,
        "search": [t.summary() for t in search.trials.values()],
        "search_skipped": search.skipped,
        "skipped_for_time": search.skipped_for_time,
        "deadline_s": deadline.seconds_for(best.sim.iteration_time_s if best.feasible else None),
        "pool_size": pool.size if pool is not None else 0,
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
        "winner": best.candidate.to_json(),
        "planning_time_s": time.perf_counter() - started,
    }
    if request.cost.host_budget:
        meta |= {"host_memory_budget": request.cost.host_budget, "offload_optimizer": request.cost.optimizer_on_host,
                 "offloaded_bytes": list(best.sim.offloaded_bytes), "exposed_copy_s": list(best.sim.exposed_copy_s)}
        if request.cost.optimizer_on_host:
            meta.setdefault("optimizer_reload_lead", optimizer_back_leads(best.plan, request.cost))
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


def plan_in_parts(request: PlanRequest, parts: list[list[int]], checkpointing: str = "ilp",
                  deadline: Deadline | None = None, pool: SearchPool | None = None) -> Plan:
    """The batch's sequences ``parts`` (lists of indices covering it) each planned by an EPP
    search of its own, at the request's budget, and joined as back-to-back pipelines (parts of
    equal lengths are planned once). Each part's search starts from the request's warm start for
    its kind of part (`WarmStart.for_part`), and the joined plan records what won each kind, for
    the next step's. Raises `NoPlanError` for the neediest part that has no plan, with its
    ``closest_bytes`` (the budget from which the whole would fit, as far as the parts' searches
    say)."""
    planned: dict[tuple[int, ...], Plan] = {}
    failed: list[tuple[float, int, NoPlanError]] = []
    warm = request.warm or WarmStart()
    for part in parts:
        lengths = tuple(request.lengths[i] for i in part)
        if lengths in planned:
            continue
        sub = dataclasses.replace(request, lengths=lengths, warm=warm.for_part(len(part) == 1))
        try:
            planned[lengths] = _plan_epp(sub, checkpointing, compose=False, deadline=deadline, pool=pool)
        except NoPlanError as exc:
            failed.append((exc.need_bytes, len(part), exc))
    if failed:
        need, count, exc = max(failed, key=lambda f: f[0])
        raise NoPlanError(f"the part of {count} sequence(s) has no plan: {exc}", exc.bound, need, exc.metadata)
    singles = [p for p in planned if len(p) == 1]
    rest = [p for p in planned if len(p) > 1]
    winners = {"alone": planned[max(singles)].metadata.get("winner") if singles else None,
               "rest": planned[rest[0]].metadata.get("winner") if rest else None}
    joined = join_plans([(planned[tuple(request.lengths[i] for i in p)], p) for p in parts], request.lengths,
                        {"planner": PLANNER_NAMES[checkpointing], "memory_budget": float(request.memory_budget),
                         "chunking": "composite", "parts": len(parts), "screened": False, "part_winners": winners})
    return _joined_host_tier(joined, request, planned[tuple(request.lengths[i] for i in parts[0])],
                             planned[tuple(request.lengths[i] for i in parts[-1])])


def _joined_host_tier(joined: Plan, request: PlanRequest, first: Plan, last: Plan) -> Plan:
    """The joined plan with what its parts planned on the host tier: the optimizer state's copy
    back where the last part's planning put it (its windows hold it there), else (the last part
    alone kept the state on the device, all its windows holding it) where the whole step's timing
    puts it. The first part's planning says which stages wait for the state's copy out."""
    cost = request.with_host_tier().cost
    if not cost.host_budget:
        return joined
    meta = {"host_memory_budget": cost.host_budget, "offload_optimizer": cost.optimizer_on_host}
    if cost.optimizer_on_host:
        timed = optimizer_back_leads(joined, cost)
        ends = last.metadata.get("optimizer_reload_lead") or [None] * joined.num_stages
        meta["optimizer_reload_lead"] = [timed[s] if lead is None else lead for s, lead in enumerate(ends)]
        if "optimizer_out_wait" in first.metadata:
            meta["optimizer_out_wait"] = first.metadata["optimizer_out_wait"]
    return dataclasses.replace(joined, metadata={**joined.metadata, **meta})


class _Search(TrialBook):
    """EPP's search strategy over the trials `TrialBook` plans and records: the warm start, the
    ladders of slice counts and baseline chunkings, the batch in parts, the frugal plan, the
    refinement of the best screens and the final tightening."""

    def _epp_trial(self, k: int, retry: bool) -> Trial:
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

    def composite(self, rule: str | None = None) -> None:
        """The batch in parts, each planned by a search of its own and run back to back: the
        sequences at the longest's length (the context cap of a truncated corpus), and again
        every sequence of at least half that length, each alone, the rest together. A long
        sequence then holds the only K/V store of its pipeline and no short work waits in its
        window, and each part gets the chunking that suits it. Tried where two or more such
        sequences share the batch, or where nothing else fits; parts of equal lengths are planned
        once. ``rule`` (a warm start's): that variant alone, whatever the batch."""
        if not self.compose or self.checkpointing != "ilp" or len(self.lengths) < 2:
            return
        capped = alone_and_rest(self.lengths, lambda n: n == self.longest)
        half = alone_and_rest(self.lengths, lambda n: 2 * n >= self.longest)
        variants = [("capped", capped), ("half", half)] if half != capped else [("half", half)]
        for name, parts in variants:
            alone = sum(len(p) == 1 and 2 * self.lengths[p[0]] >= self.longest for p in parts)
            cand = Candidate("composite", alone, rule=name)
            if (cand, False) in self.trials or (rule is not None and name != rule):
                continue
            if rule is None and alone < 2 and self.leader() is not None:
                continue
            if self.out_of_time(False):
                self.skipped_for_time.append(cand.label)
                continue
            t0 = time.perf_counter()
            leader = self.leader()
            deadline = self.deadline.for_part(leader.sim.iteration_time_s if leader else None)
            try:
                plan = plan_in_parts(self.request, parts, self.checkpointing, deadline, self.pool)
            except OutOfTime:
                self.skipped_for_time.append(cand.label)
                continue
            except NoPlanError as exc:
                trial = Trial(cand, False, None, None, str(exc),
                              memory_error=InfeasibleMemoryError(exc.bound.stage, (), exc.need_bytes, self.memory))
            else:
                trial = Trial(cand, False, plan, simulate(plan, self.cost, self.memory, self.request.link))
            trial.seconds = time.perf_counter() - t0
            self.trials[(cand, False)] = trial

    def frugal(self) -> None:
        """`frugal_plan`, checkpointed by the ILP (or left at full recompute by that ablation):
        tried where EPP's own chunkings fit nowhere, so that every budget from its peak on has a
        plan."""
        t0 = time.perf_counter()
        cand = Candidate("frugal", 0)
        plan = frugal_plan(self.request)
        plan = dataclasses.replace(plan, metadata={**plan.metadata, "planner": PLANNER_NAMES[self.checkpointing],
                                                   "memory_budget": self.memory})
        trial = Trial(cand, False, plan, simulate(plan, self.cost, self.memory, self.request.link))
        need = max(trial.sim.peak_memory_bytes)
        if need > self.memory:
            trial = Trial(cand, False, None, None, f"needs {format_bytes(need)} with every layer recomputed",
                           memory_error=InfeasibleMemoryError(int(max(range(len(self.layers)),
                                                                      key=trial.sim.peak_memory_bytes.__getitem__)),
                                                              (), need, self.memory))
        elif self.checkpointing == "ilp":  # full recompute fits: the ILP's answer is at most as slow
            try:
                plan = solve_checkpointing(plan, self.cost, self.memory, self.plan_gap, self.options.time_limit_s,
                                           cache=self.cache)
                trial = Trial(cand, False, plan, simulate(plan, self.cost, self.memory, self.request.link))
            except InfeasibleMemoryError:  # the host tier's copies, timed more cautiously than played
                pass
        trial.seconds = time.perf_counter() - t0
        self.trials[(cand, False)] = trial

    def _out_of_reach(self, ladder: dict[int, Trial], k: int, what: str) -> bool:
        """Whether the slice count ``k`` (past the ladder's last rung: every count up to ``k``)
        cannot beat the leader, with the screened time taken as convex in log K (`convex_floor`):
        the ladder's times are close to unimodal, and its largest rungs cost the most. A count
        left out is recorded, as ``what``, for ``--explain``."""
        leader = self.leader(screened=True)
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
            [Candidate("balanced", n) for n in seq1f1b_slice_counts(self.longest)],
            [Candidate("whole", self.longest)],
            [Candidate("fixed", n) for n in sorted(powers - {self.longest}, reverse=True)],
            [Candidate("fixed", n) for n in sorted(uniform - powers - {self.longest}, reverse=True)],
        ]

    def _screen_ladders(self, ladders: list[list[Candidate]]) -> None:
        """A ladder stops at its first step that does not gain (its plans' times are close to
        unimodal in the size), or where `_plan_for`'s bound prunes."""
        self.prefetch([c for ladder in ladders for c in ladder], True)
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

    def refine(self, top: int) -> None:
        """The ``top`` best screens planned in full, each also in the interleaved order where
        its plan recomputes."""
        screened = sorted((t for (_, screen), t in self.trials.items() if screen and t.plan is not None),
                          key=lambda t: t.score())[:top]
        # Where memory binds, the same chunks with short work between the split sequences
        # (their stores apart, the short work in their window) may need less.
        wanted = [[t.candidate] + ([dataclasses.replace(t.candidate, order=Order("interleaved"))]
                                   if self.checkpointing == "ilp" and t.sim.recompute_time_s > 0 else [])
                  for t in screened]
        self.prefetch([c for pair in wanted for c in pair], False)
        for pair in wanted:
            for cand in pair:
                self.trial(cand, False)

    def retime(self) -> None:
        """The best full 1F1B trial's chunks and pipelines also in timed orders (`timed_order`)."""
        fits = [t for (c, screen), t in self.trials.items()
                if not screen and t.feasible and c.order.kind == "1f1b" and c.family not in ("composite", "frugal")]
        if self.checkpointing == "ilp" and fits and self.options.timed_orders:
            self._retime_from(min(fits, key=lambda t: t.score()))

    def _retime_from(self, base: Trial) -> None:
        """``base`` reordered: the lead of light chunks on a grid of the stage count, then the best
        lead with more slack, then the best orders of the two best leads with weight gradients
        deferred (`DEFER_CAPS`). The simulator judges; all but the lead grid is skipped where its
        best was planned and lost by more than RETIME_MARGIN (memory binds: more in flight only adds recompute),
        and all of it where no order could gain that much."""
        # No order makes a stage's own work shorter: where the base is already within
        # RETIME_MARGIN of its busiest stage's recompute-free work, no reordering can pay.
        work = max(b - r for b, r in zip(base.sim.busy_s, base.sim.recompute_s))
        if base.sim.iteration_time_s <= work * (1 + RETIME_MARGIN):
            return
        stages = len(self.layers)
        leads = sorted({0, max(stages // 2, 1), stages, 3 * stages // 2})
        # An order pruned for tying the leader without W actions may still gain with them: the
        # grid goes by what each order could reach, and only a planned order that lost (memory
        # binds: its recompute) ends it; a pruned one's floor says nothing of its W variants,
        # which are pruned on their own floors at the cost of a simulation.
        tried = [self.reordered(base, Order("timed", lead)) for lead in leads]
        best = min(tried, key=lambda t: t.reach_s())
        if best.feasible and best.sim.iteration_time_s > base.sim.iteration_time_s * (1 + RETIME_MARGIN):
            return
        tried.append(self.reordered(base, Order("timed", best.candidate.order.lead, SLACK)))
        # Weight gradients left to W actions where a stage would wait: the stash they keep until
        # then is memory, so a few caps on how many may wait at once, on the best orders of the
        # two best leads.
        by_lead: dict[int, Trial] = {}
        for t in sorted((t for t in tried if t.reach_s() < math.inf), key=lambda t: t.reach_s()):
            by_lead.setdefault(t.candidate.order.lead, t)
        for top in list(by_lead.values())[:2]:
            for defer in DEFER_CAPS:
                self.reordered(base, dataclasses.replace(top.candidate.order, defer=defer))

    def warm(self) -> None:
        """The warm start's winner first, planned in full (a composite: its rule, each part
        starting from its own part's winner; a timed order: its 1F1B trial reordered), then its
        neighbours screened: the next rung either way on its ladder."""
        choice = self.request.warm.choice if self.request.warm is not None else None
        if choice is None or choice.family == "frugal":
            return
        if choice.family == "composite":
            self.composite(rule=choice.rule)
            return
        cand = self._adapted(choice)
        if cand is None:
            return
        near = [c for c in map(self._adapted, self._neighbours(cand)) if c is not None and c != cand]
        base = dataclasses.replace(cand, order=Order()) if cand.order.kind == "timed" else cand
        self.prefetch([base], False)
        self.prefetch(near, True)
        trial = self.trial(base, False)
        if base != cand and trial.feasible:  # a timed order reorders its 1F1B trial, as `retime` does
            self.reordered(trial, cand.order, hinted=True)
        for c in near:
            self.trial(c, True)

    def _adapted(self, cand: Candidate) -> Candidate | None:
        """``cand`` as this batch can plan it (None where its size has no meaning here): the
        slice count within the search's range, a token capacity no larger than this batch's,
        a chunk size below the longest sequence."""
        if cand.family == "epp":
            hi = min(self.options.max_slices, self.longest)
            cap = min(cand.token_capacity or self.token_capacity, self.token_capacity)
            return dataclasses.replace(cand, size=max(1, min(cand.size, hi)), token_capacity=cap)
        if cand.family == "balanced":
            return cand if cand.size in seq1f1b_slice_counts(self.longest) else None
        if cand.family == "fixed":
            return cand if cand.size < self.longest else None
        if cand.family == "whole":
            return dataclasses.replace(cand, size=self.longest)
        return None

    @staticmethod
    def _neighbours(cand: Candidate) -> list[Candidate]:
        if cand.family == "epp":
            sizes = (round(cand.size / 1.5), round(cand.size * 1.5))
        elif cand.family in ("balanced", "fixed"):
            sizes = (cand.size // 2, cand.size * 2)
        else:
            return []
        return [dataclasses.replace(cand, size=n, order=Order()) for n in sizes if n >= 1]

    def run(self) -> Trial:
        """Screen the K ladder (bisecting towards the best rung) and the baselines' chunkings,
        give the top few the full grouping search, then tighten the winner's checkpointing. The
        K ladder stops, and a bisection point is skipped, where `convex_floor` of its screened
        times says no slice count there can beat the leader.

        Likely winners come first: a warm start's choices before anything, and under a deadline
        the best screen of the first ladder is planned in full at once, so that what the
        deadline cuts is the unlikely rest."""
        # Slices under MIN_SLICE_TOKENS waste the device, but one cut is always worth a look:
        # the simulator, not the heuristic, says whether it pays.
        hi = max(1, min(self.options.max_slices, self.longest, max(2, self.longest // MIN_SLICE_TOKENS)))
        lo = min(hi, self.options.min_slices)
        tried = sorted(set(slice_count_ladder(lo, hi)))
        families = self._baseline_ladders() if self.checkpointing == "ilp" else []
        self.warm()
        self._screen_ladders(families[:1])  # a strong leader early lets the bound skip more ILPs
        if self.deadline.active:
            self.refine(1)
        # Capacity is searched only while memory, not the slice count, ends the ladder early.
        best: dict[int, Trial] = {}
        self.prefetch([Candidate("epp", k, self.token_capacity) for k in tried], True)
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
            self.prefetch([Candidate("epp", k, self.token_capacity) for k in sorted(new)], True)
            best.update({k: self._epp_trial(k, retry=False) for k in sorted(new)})
            tried = sorted(set(tried) | new)
        self._screen_ladders(families[1:])
        self.refine(self.options.refine_top)
        self.retime()
        # A slice count whose one or two pipelines cannot fit even with full recompute may fit
        # as more pipelines: the closest such screen gets the grouping search too, as the
        # full-recompute ablation's best screen does.
        blocked = [t for (c, screen), t in self.trials.items()
                   if screen and c.family == "epp" and t.memory_error is not None]
        if blocked:
            self.trial(min(blocked, key=lambda t: t.memory_error.min_memory_bytes).candidate, False)
        self.composite()
        # Where EPP's own chunkings (the K and Seq1F1B ladders) fit nowhere, the least-memory plan
        # may beat a baseline's small chunks, as it does in the full-recompute ablation's search.
        own_fit = any(t.feasible for (c, _), t in self.trials.items() if c.family in ("epp", "balanced"))
        if not own_fit and self.checkpointing != "none" and not self.out_of_time(False):
            self.frugal()
        if not self.trials:  # a strict deadline passed before any candidate started
            raise OutOfTime("no candidate planned before the deadline")
        return self.tighten(min(self.trials.values(), key=lambda t: t.score()))

    def tighten(self, trial: Trial) -> Trial:
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
        if self.out_of_time(False):
            self.skipped_for_time.append(f"{trial.candidate.label} (checkpointing at mip_gap {gap:g})")
            return trial
        plan = solve_checkpointing(trial.plan, self.cost, self.memory, gap, self.options.time_limit_s, cache=self.cache)
        plan = dataclasses.replace(plan, metadata={**plan.metadata, "screened": False})
        tight = Trial(trial.candidate, False, plan, simulate(plan, self.cost, self.memory, self.request.link))
        if tight.score() < trial.score():  # recorded in place of the full trial it improves on
            self.trials[(trial.candidate, False)] = tight
        else:
            self.trials.setdefault((trial.candidate, False), tight)
        return min((tight, trial), key=lambda t: t.score())
