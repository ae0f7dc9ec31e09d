"""Stage-aware chunk-level adaptive checkpointing (paper §6) as a small integer program.

A recompute on one stage delays that stage, and the delay reaches every other stage as a bubble.
Backwards that run at the same moment of a 1F1B pipeline (stage ``s``'s ``k``-th backward and
stage ``s + i``'s ``(k + i)``-th) lie on one *diagonal* and can share a checkpoint depth at no
extra cost, so each pipeline of ``n`` chunks gets ``n + d_p - 1`` integer variables: the layers
recomputed by the chunks on each diagonal.

Memory of a stage is linear in those variables, so every in-flight window of every stage (the
chunks whose backward is pending, found by walking the stage's actions) is one linear
constraint. The objective weights each variable by the one-layer forward time of the largest
chunk on its diagonal: that is the delay one more recomputed layer adds there (the paper counts
layers; chunks of very different sizes make time the better measure).

Where the profile offers elementwise recompute (a layer that recomputes only its norms' outputs
and SwiGLU product), each diagonal gets a second integer: ``u``, its layers recomputed whole or
elementwise (``r <= u <= n``, so ``u - r`` layers run elementwise). Memory stays concave in
``min(r, cap)`` and ``min(u, cap)`` (`ChunkMemory`) and the objective weighs ``r`` by the
forward less the elementwise time and ``u`` by the elementwise time.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import highspy
import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components

from ..contract.cost import CostModel
from ..contract.ir import Action, Plan
from ..contract.shapes import ChunkShape
from ..contract.units import GIB, format_bytes
from ..sim.host_schedule import action_starts
from ..sim.simulator import gradient_store_bytes
from .offload import Offload, plan_offload

_FEAS_TOL = 1.0  # bytes: slack allowed when checking a rounded solution
_ROWS_PER_ROUND = 100  # most violated windows the LP relaxation takes in per round
_ROW_TOL = 1e-9  # GiB: a window short by less is not taken in (rounding and `greedy` settle it)


class InfeasibleMemoryError(ValueError):
    """Even recomputing every layer, one window of one stage does not fit its budget."""

    def __init__(self, stage: int, window: tuple[int, ...], min_memory_bytes: float, budget: float):
        self.stage = stage
        self.window = window
        self.min_memory_bytes = min_memory_bytes
        self.budget = budget
        what = f"chunks {list(window)}" if window else "even a one-token chunk"
        super().__init__(
            f"stage {stage} cannot hold {what} in {format_bytes(budget)} even with every layer recomputed; "
            f"the smallest budget that fits this stage is {format_bytes(min_memory_bytes)} ({min_memory_bytes:.0f} bytes)"
        )

    def __reduce__(self):
        """Rebuilt from its fields, so the message survives the planning process's pickling."""
        return type(self), (self.stage, self.window, self.min_memory_bytes, self.budget)


@dataclass
class SolverCache:
    """What planning one batch reuses across ILPs: cost terms per chunk shape, answers of
    identical (sub-)problems keyed by their digest and gap, and the problems of plans that
    differ only in what the problem ignores (metadata, recompute, sequence numbering): a
    planner costs a candidate's pipeline before it builds and checkpoints the plan."""

    terms: dict[tuple, Any] = field(default_factory=dict)
    solutions: dict[tuple[str, float], tuple[np.ndarray, dict[str, Any]]] = field(default_factory=dict)
    problems: dict[tuple, "PlanProblem"] = field(default_factory=dict)


@dataclass(frozen=True)
class Window:
    """Chunks a stage holds while it runs action ``kind`` of chunk ``own`` (one of ``chunks``)."""

    stage: int
    chunks: tuple[int, ...]
    own: int
    kind: str


@dataclass(frozen=True)
class Windows:
    """The windows of a problem's rows as arrays, each `Window` built on demand: a plan has
    thousands and only an error message names one."""

    stages: np.ndarray     # stage of each window
    starts: np.ndarray     # where its chunks begin in ``flat``
    lens: np.ndarray       # how many chunks it holds
    flat: np.ndarray       # every window's chunks, concatenated
    own: np.ndarray        # the chunk whose action runs
    forward: np.ndarray    # whether that action is its forward

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, i: int) -> Window:
        start, n = int(self.starts[i]), int(self.lens[i])
        return Window(int(self.stages[i]), tuple(self.flat[start:start + n].tolist()), int(self.own[i]),
                      "F" if self.forward[i] else "B")


@dataclass
class CheckpointProblem:
    """The integer program of one plan (or one independent part of it), as plain arrays."""

    upper: np.ndarray                    # layers each diagonal may recompute
    weight_ms: np.ndarray                # recompute time of one layer on each diagonal
    need: np.ndarray                     # bytes each window must save by recompute
    rows: np.ndarray                     # sparse entries: window row,
    cols: np.ndarray                     #   diagonal variable,
    slope: np.ndarray                    #   bytes saved per recomputed layer,
    layer_cap: np.ndarray                #   layers of that entry's stage
    ties: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))  # (r, u): x_r <= x_u

    def savings(self, c: np.ndarray) -> np.ndarray:
        per_entry = self.slope * np.minimum(c[self.cols], self.layer_cap)
        return np.bincount(self.rows, weights=per_entry, minlength=len(self.need))

    def deficit(self, c: np.ndarray) -> np.ndarray:
        return self.need - self.savings(c)

    @functools.cached_property
    def key(self) -> str:
        """Digest of everything the solution depends on, for caching across identical problems
        (kept: a cached plan's problem is looked up again by every plan that repeats it)."""
        h = hashlib.blake2b(digest_size=16)
        for arr in (self.upper, self.weight_ms, self.need, self.rows, self.cols, self.slope, self.layer_cap, self.ties):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def parts(self) -> list[tuple[np.ndarray, "CheckpointProblem"]]:
        """Independent sub-problems (variables linked through shared windows), with their variables.

        Back-to-back pipelines share no window, so each is solved (and cached) on its own: the
        grouping search and the final plan then hit the same cache entries.
        """
        n_rows, n_vars = len(self.need), len(self.upper)
        if not n_rows:
            return []
        graph = coo_matrix((np.ones(len(self.rows) + len(self.ties)),
                            (np.r_[self.rows, n_rows + self.ties[:, 0]], n_rows + np.r_[self.cols, self.ties[:, 1]])),
                           shape=(n_rows + n_vars, n_rows + n_vars))
        count, label = connected_components(graph, directed=False)
        if count == 1:
            return [(np.arange(n_vars), self)]
        out = []
        for lab in np.unique(label[:n_rows]):
            row_ids = np.flatnonzero(label[:n_rows] == lab)
            var_ids = np.flatnonzero(label[n_rows:] == lab)
            entry = np.isin(self.rows, row_ids)
            ties = self.ties[np.isin(self.ties[:, 0], var_ids)]
            out.append((var_ids, CheckpointProblem(
                upper=self.upper[var_ids], weight_ms=self.weight_ms[var_ids], need=self.need[row_ids],
                rows=np.searchsorted(row_ids, self.rows[entry]), cols=np.searchsorted(var_ids, self.cols[entry]),
                slope=self.slope[entry], layer_cap=self.layer_cap[entry],
                ties=np.searchsorted(var_ids, ties).reshape(-1, 2))))
        return out


@dataclass
class PlanProblem:
    """A plan's checkpointing problem with the bookkeeping to map answers back to actions."""

    plan: Plan
    var_of: dict[tuple[int, int], int]   # (stage, chunk) -> diagonal variable (its ``u`` is ``elementwise_of``)
    windows: Windows                     # the window of each row
    full_memory: np.ndarray              # each window's memory with every layer recomputed
    budgets: np.ndarray                     # budget of each stage
    problem: CheckpointProblem
    elementwise_of: int = 0              # offset from a diagonal's ``r`` to its ``u`` (0: no elementwise)
    offload: Offload | None = None       # what waits on the host (`plan_offload`), where anything does


def stage_budgets(memory_budget: float | Sequence[float], num_stages: int) -> np.ndarray:
    if isinstance(memory_budget, (int, float)):
        budgets = np.full(num_stages, float(memory_budget))
    else:
        budgets = np.asarray([float(m) for m in memory_budget])
        if len(budgets) != num_stages:
            raise ValueError(f"memory_budget has {len(budgets)} entries for {num_stages} stages")
    if not np.all(np.isfinite(budgets)) or np.any(budgets <= 0):
        raise ValueError(f"memory_budget must be positive and finite, got {budgets.tolist()}")
    return budgets


def stage_windows(plan: Plan, stage: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One window per action of a stage: the chunks held while it runs, its own chunk included,
    in the order of their forwards. As arrays (each window's chunk count, all windows' chunks
    concatenated, each one's own chunk, whether it is a forward): a plan has thousands, and only
    those over budget become `Window`s.

    A chunk is held by every action from its forward to its backward, both included, so the
    windows are built from those intervals without walking a pending list."""
    actions = plan.stage_actions[stage]
    own = np.fromiter((a.chunk_id for a in actions), dtype=np.int64, count=len(actions))
    forward = np.fromiter((a.kind == "F" for a in actions), dtype=bool, count=len(actions))
    at = np.arange(len(actions))
    f_at = np.zeros(len(plan.chunks), dtype=np.int64)
    b_at = np.zeros(len(plan.chunks), dtype=np.int64)
    f_at[own[forward]] = at[forward]
    b_at[own[~forward]] = at[~forward]
    held = own[forward]  # chunks in forward order
    span = b_at[held] - f_at[held] + 1
    window = np.repeat(f_at[held] - np.cumsum(span) + span, span) + np.arange(int(span.sum()))
    chunk = np.repeat(held, span)
    order = np.argsort(window, kind="stable")  # stable: forward order inside each window
    lens = np.bincount(window, minlength=len(actions))
    return lens, chunk[order], own, forward


def diagonal_variables(plan: Plan) -> tuple[dict[tuple[int, int], int], list[int]]:
    """Map each (stage, chunk) to its diagonal variable; return also each pipeline's variable offset."""
    num_stages = plan.num_stages
    b_order = [a.chunk_id for a in plan.stage_actions[0] if a.kind == "B"]
    var_of: dict[tuple[int, int], int] = {}
    offsets = []
    offset = 0
    for pipe in plan.pipelines:
        members = set(pipe)
        order = [c for c in b_order if c in members]
        offsets.append(offset)
        for pos, cid in enumerate(order):
            for s in range(num_stages):
                var_of[(s, cid)] = offset + pos + (num_stages - 1 - s)
        offset += len(order) + num_stages - 1
    return var_of, offsets


def build_problem(plan: Plan, cost: CostModel, memory_budget: float | Sequence[float],
                  cache: SolverCache | None = None) -> PlanProblem:
    """Windows and their linear memory constraints; ``cache`` keeps per-shape cost terms across calls."""
    num_stages = plan.num_stages
    budgets = stage_budgets(memory_budget, num_stages)
    layers = plan.layers_per_stage
    cache = cache if cache is not None else SolverCache()
    memo = cache.terms
    shapes = [ChunkShape.of(c, plan.seq_lengths) for c in plan.chunks]
    key = (tuple(shapes), tuple(budgets.tolist()), layers, plan.pipelines, cost.host_budget, cost.optimizer_on_host,
           tuple(tuple((a.kind, a.chunk_id) for a in actions) for actions in plan.stage_actions))
    if key in cache.problems:
        return dataclasses.replace(cache.problems[key], plan=plan)
    offload = plan_offload(plan, cost, shapes, _binding(plan, cost, shapes, budgets, memo), memo) if cost.host_budget else None
    var_of, _ = diagonal_variables(plan)
    nvars = max(var_of.values()) + 1 if var_of else 0
    # Diagonal of (stage s, chunk c) = diagonal of (last stage, c) + (last - s).
    var_last = np.array([var_of[(num_stages - 1, c.id)] for c in plan.chunks], dtype=np.int64)

    def term(fn, *args) -> float:
        key = (fn.__name__, *args)
        if key not in memo:
            memo[key] = fn(*args)
        return memo[key]

    one_layer = np.array([term(cost.recompute_ms, sh, 1) for sh in shapes])
    elementwise = cost.elementwise
    one_elem = np.array([term(cost.recompute_ms, sh, 0, 1) for sh in shapes]) if elementwise else np.zeros(len(shapes))
    upper = np.zeros(nvars)
    weight = np.zeros(nvars)
    weight_e = np.zeros(nvars)
    for s in range(num_stages):
        v = var_last + (num_stages - 1 - s)
        np.maximum.at(upper, v, layers[s])
        np.maximum.at(weight, v, one_layer)
        np.maximum.at(weight_e, v, one_elem)
    # With elementwise recompute, variable ``nvars + d`` is diagonal d's ``u`` (whole + elementwise).
    u_of = nvars if elementwise else 0
    if elementwise:
        upper = np.r_[upper, upper]
        weight = np.r_[np.maximum(weight - weight_e, 0.0), weight_e]

    def memory_terms(sh: ChunkShape, n_l: int, first: bool, last: bool) -> tuple[float, ...]:
        key = ("chunk_memory", sh, n_l, first, last)
        if key not in memo:
            memo[key] = cost.chunk_memory(sh, n_l, first, last).row()
        return memo[key]

    act_bytes = np.array([term(cost.layer_act_bytes, sh) for sh in shapes])
    ckpt_bytes = np.array([term(cost.ckpt_layer_bytes, sh) for sh in shapes])
    back_leads: list[int | None] = list(offload.optimizer_back_lead) if offload is not None else []
    n_rows = 0
    win_stage, win_start, win_len, win_flat, win_own, win_fwd = [], [], [], [], [], []
    need, full_mem, rows, cols, slope, lcap = [], [], [], [], [], []
    by_role: dict[tuple[int, bool, bool], list[np.ndarray]] = {}
    flat_seen = 0  # length of win_flat so far
    for s in range(num_stages):
        first, last, n_l = s == 0, s == num_stages - 1, layers[s]
        if (n_l, first, last) not in by_role:  # stages alike in role and layers share their terms
            by_role[(n_l, first, last)] = [np.array(col) for col in zip(*(memory_terms(sh, n_l, first, last) for sh in shapes))]
        base, per_layer, fwd_work, fwd_extra, bwd_work, bwd_extra, e_slope, fwd_e_extra, bwd_e_extra = \
            by_role[(n_l, first, last)]
        states = cost.model_state_bytes(n_l, first, last)
        lens, flat, own, forward = stage_windows(plan, s)
        row = np.repeat(np.arange(len(lens)), lens)
        work = np.where(forward, fwd_work[own], bwd_work[own])
        extra = np.where(forward, fwd_extra[own], bwd_extra[own])  # added at its own full recompute
        e_extra = np.where(forward, fwd_e_extra[own], bwd_e_extra[own])  # at elementwise with none stored
        grads, _ = gradient_store_bytes(plan, s, cost, shapes)
        # A chunk whose offloaded layers are on the host in a window holds none of their bytes
        # there, and recompute saves only on its other layers (`Offload`).
        moved, cap = np.zeros(len(flat)), np.full(len(flat), float(n_l))
        if offload is not None:
            off = offload.stages[s]
            between = off.between(row, flat)
            moved[between] = (off.layers[flat] * act_bytes[flat])[between]
            if not first:  # the stage's received input stays (`CostModel.offloaded_bytes`)
                whole = between & (off.layers[flat] == n_l)
                moved[whole] -= ckpt_bytes[flat][whole]
            cap[between] -= off.layers[flat][between]
        held_full = base[flat] - moved - cap * per_layer[flat]
        if offload is not None and cost.optimizer_on_host:
            least = states + work + grads + extra + np.bincount(row, weights=held_full, minlength=len(lens))
            states = states + _optimizer_on_device(plan, cost, s, shapes, offload, least, budgets[s], back_leads, memo)
        no_ckpt = states + work + grads + np.bincount(row, weights=base[flat] - moved, minlength=len(lens))
        keep = no_ckpt > budgets[s]
        if not keep.any():
            continue
        starts = np.cumsum(lens) - lens + flat_seen
        flat_seen += len(flat)
        new_row = np.cumsum(keep) - 1 + n_rows
        n_rows += int(keep.sum())
        win_stage.append(np.full(int(keep.sum()), s))
        win_start.append(starts[keep])
        win_len.append(lens[keep])
        win_flat.append(flat)
        win_own.append(own[keep])
        win_fwd.append(forward[keep])
        need.append(no_ckpt[keep] - budgets[s])
        full_mem.append((states + work + grads + extra + np.bincount(row, weights=held_full, minlength=len(lens)))[keep])
        # Every chunk of a window saves per_layer x min(r, n); its own chunk saves extra less at r = n,
        # written as (per_layer - extra) x min(r, n) + extra x min(r, n - 1). With elementwise
        # recompute the same holds of (e_slope, e_extra) and u, less from r (`ChunkMemory`).
        entry = keep[row]
        kept = flat[entry]
        is_own = kept == own[row[entry]]
        var = var_last + (num_stages - 1 - s)
        own_extra = extra - e_extra
        per_var = [(0, per_layer - e_slope, own_extra)] + ([(u_of, e_slope, e_extra)] if elementwise else [])
        for offset, k_layer, k_extra in per_var:
            rows.append(new_row[row[entry]])
            cols.append(var[kept] + offset)
            slope.append(k_layer[kept] - np.where(is_own, k_extra[row[entry]], 0.0))
            lcap.append(cap[entry])
            mine = keep & (k_extra > 0) if n_l > 1 else np.zeros_like(keep)
            rows.append(new_row[mine])
            cols.append(var[own[mine]] + offset)
            slope.append(k_extra[mine])
            lcap.append(np.full(int(mine.sum()), float(n_l - 1)))

    def cat(parts: list, dtype) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

    ties = np.stack([np.arange(nvars), nvars + np.arange(nvars)], axis=1) if elementwise else np.zeros((0, 2))
    problem = CheckpointProblem(
        upper=upper, weight_ms=weight, need=cat(need, float), rows=cat(rows, np.int64),
        cols=cat(cols, np.int64), slope=cat(slope, float), layer_cap=cat(lcap, float), ties=ties.astype(np.int64))
    windows = Windows(cat(win_stage, np.int64), cat(win_start, np.int64), cat(win_len, np.int64),
                      cat(win_flat, np.int64), cat(win_own, np.int64), cat(win_fwd, bool))
    if offload is not None:
        offload = dataclasses.replace(offload, optimizer_back_lead=tuple(back_leads))
    cache.problems[key] = PlanProblem(plan=plan, var_of=var_of, windows=windows, full_memory=cat(full_mem, float),
                                      budgets=budgets, problem=problem, elementwise_of=u_of,
                                      offload=offload)
    return cache.problems[key]


def _binding(plan: Plan, cost: CostModel, shapes: list[ChunkShape], budgets: np.ndarray, memo: dict) -> list[np.ndarray]:
    """Per stage and action, whether its window exceeds the stage's budget with nothing
    recomputed or offloaded (the windows where a byte off the device saves recompute)."""
    out = []
    last = plan.num_stages - 1
    for s, n in enumerate(plan.layers_per_stage):
        first, is_last = s == 0, s == last
        rows = []
        for sh in shapes:
            key = ("chunk_memory", sh, n, first, is_last)
            if key not in memo:
                memo[key] = cost.chunk_memory(sh, n, first, is_last).row()
            rows.append(memo[key][:5:2])
        base, fwd_work, bwd_work = np.array(rows).reshape(len(shapes), 3).T
        lens, flat, own, forward = stage_windows(plan, s)
        row = np.repeat(np.arange(len(lens)), lens)
        grads, _ = gradient_store_bytes(plan, s, cost, shapes)
        held = np.bincount(row, weights=base[flat], minlength=len(lens))
        out.append(cost.model_state_bytes(n, first, is_last) + np.where(forward, fwd_work[own], bwd_work[own])
                   + grads + held > budgets[s])
    return out


def _optimizer_on_device(plan: Plan, cost: CostModel, stage: int, shapes: list[ChunkShape], offload: Offload,
                         least: np.ndarray, budget: float, back_leads: list[int], memo: dict) -> np.ndarray:
    """Per action of ``stage``: the optimizer state on the device while it runs, where the state
    waits on the host: until its copy out ends (`Offload.optimizer_out_s`; actions back to back
    start no later than they do) and again from the start of its copy back, which begins
    `Offload.optimizer_back_lead` actions before the stage's end, or later where the last
    actions could not hold it even at their ``least`` memory (full recompute): at the latest,
    after the stage's last action (``back_leads[stage]`` is set to the lead used). A stage
    whose step is too short for the round trip (lead None) keeps the state all step."""
    actions = plan.stage_actions[stage]
    start, _ = action_starts(plan, cost, stage, shapes, memo)
    last = plan.num_stages - 1
    opt = cost.optimizer_host_bytes(plan.layers_per_stage[stage], stage == 0, stage == last)
    lead = back_leads[stage]
    if lead is None:
        return np.full(len(actions), opt)
    while lead and least[len(actions) - lead:].max() + opt > budget:
        lead -= 1
    back_leads[stage] = lead
    on_device = np.where(start < offload.optimizer_out_s[stage], opt, 0.0)
    on_device[len(actions) - lead:] = opt if lead else 0.0  # copied back for the optimizer step
    return on_device


def check_full_recompute(pp: PlanProblem) -> None:
    """Raise `InfeasibleMemoryError` for the worst window that full recompute cannot fit."""
    if not pp.windows:
        return
    over = pp.full_memory - pp.budgets[pp.windows.stages]
    worst = int(np.argmax(over))
    if over[worst] <= _FEAS_TOL:
        return
    stage = pp.windows[worst].stage
    on_stage = np.flatnonzero(pp.windows.stages == stage)
    raise InfeasibleMemoryError(
        stage=stage,
        window=pp.windows[worst].chunks,
        min_memory_bytes=float(max(pp.full_memory[i] for i in on_stage)),
        budget=float(pp.budgets[stage]),
    )


def greedy(problem: CheckpointProblem, start: np.ndarray | None = None) -> np.ndarray:
    """Raise diagonals one layer at a time, best memory saved per millisecond first, until all fit.
    A diagonal's ``r`` at its ``u`` rises together with it (one more layer recomputed whole)."""
    c = np.zeros(len(problem.upper)) if start is None else start.astype(float).copy()
    r_var, u_var = problem.ties.T
    while True:
        deficit = problem.deficit(c)
        violated = deficit > _FEAS_TOL
        if not violated.any():
            return c
        live = violated[problem.rows] & (c[problem.cols] < problem.layer_cap)
        gain = np.bincount(problem.cols[live], weights=np.minimum(problem.slope[live], deficit[problem.rows[live]]),
                           minlength=len(c))
        weight = problem.weight_ms.copy()
        joint = c[r_var] >= c[u_var]
        gain[r_var[joint]] = np.where(c[u_var[joint]] < problem.upper[u_var[joint]],
                                      gain[r_var[joint]] + gain[u_var[joint]], 0.0)
        weight[r_var[joint]] += weight[u_var[joint]]
        best = int(np.argmax(gain / np.maximum(weight, 1e-12)))
        if gain[best] <= 0:
            raise RuntimeError("greedy checkpointing stalled although full recompute fits")
        c[best] += 1
        tied = np.flatnonzero(r_var == best)
        if len(tied) and c[best] > c[u_var[tied[0]]]:
            c[u_var[tied[0]]] = c[best]


def descend(problem: CheckpointProblem, c: np.ndarray) -> np.ndarray:
    """Lower diagonals one layer at a time, dearest first, while every window still fits."""
    c = c.astype(float).copy()
    slack = problem.savings(c) - problem.need
    by_var = np.argsort(problem.cols, kind="stable")
    bounds = np.searchsorted(problem.cols[by_var], np.arange(len(c) + 1))
    below = np.full(len(c), -1)  # a diagonal's u stays at or above its r
    below[problem.ties[:, 1]] = problem.ties[:, 0]
    for v in np.argsort(-problem.weight_ms, kind="stable"):
        if c[v] == 0:
            continue
        entries = by_var[bounds[v]:bounds[v + 1]]
        slope, cap = problem.slope[entries], problem.layer_cap[entries]
        # A window may hold two entries of one variable (a chunk's own forward or backward).
        rows, inv = np.unique(problem.rows[entries], return_inverse=True)
        floor = c[below[v]] if below[v] >= 0 else 0.0
        while c[v] > floor:
            loss = np.bincount(inv, weights=slope * (np.minimum(c[v], cap) - np.minimum(c[v] - 1, cap)),
                               minlength=len(rows))
            if np.any(slack[rows] - loss < -_FEAS_TOL):
                break
            slack[rows] -= loss
            c[v] -= 1
    return c


@dataclass(frozen=True)
class LinearForm:
    """A `CheckpointProblem` as HiGHS takes it: ``min objective x`` subject to
    ``memory x >= need``, ``link x <= 0`` and ``0 <= x <= upper``, in GiB.

    Variables: one integer per diagonal (two with elementwise recompute, ``r`` and ``u``, which a
    ``link`` row keeps in order), then one continuous ``min(c_d, cap)`` per distinct (variable,
    cap) whose cap is below the variable's bound (a stage with fewer layers; a chunk's own
    window, where full recompute saves one layer less), tied to its variable by a ``link`` row."""

    memory: csr_matrix
    need: np.ndarray
    link: csr_matrix
    objective: np.ndarray
    upper: np.ndarray
    integers: int  # the first ``integers`` variables, one per diagonal

    @classmethod
    def of(cls, problem: CheckpointProblem) -> "LinearForm":
        nvars = len(problem.upper)
        clipped = np.flatnonzero(problem.layer_cap < problem.upper[problem.cols])
        span = int(problem.layer_cap.max(initial=0)) + 1  # caps are whole layer counts
        pair_ids, aux_of = np.unique(problem.cols[clipped] * span + problem.layer_cap[clipped].astype(np.int64),
                                     return_inverse=True)
        pairs = np.stack([pair_ids // span, pair_ids % span])
        n_aux = pairs.shape[1]
        entry_var = problem.cols.copy()
        entry_var[clipped] = nvars + aux_of.reshape(-1)
        memory = csr_matrix((problem.slope / GIB, (problem.rows, entry_var)), shape=(len(problem.need), nvars + n_aux))
        aux = np.arange(n_aux)
        n_ties = len(problem.ties)
        order = n_aux + np.arange(n_ties)
        tie = (np.r_[aux, aux, order, order],
               np.r_[nvars + aux, pairs[0].astype(np.int64), problem.ties[:, 0], problem.ties[:, 1]])
        link = csr_matrix((np.r_[np.ones(n_aux), -np.ones(n_aux), np.ones(n_ties), -np.ones(n_ties)], tie),
                          shape=(n_aux + n_ties, nvars + n_aux))
        return cls(memory, problem.need / GIB, link, np.concatenate([problem.weight_ms, np.zeros(n_aux)]),
                   np.concatenate([problem.upper, pairs[1]]), nvars)


def solve_problem(problem: CheckpointProblem, mip_gap: float, time_limit_s: float) -> tuple[np.ndarray, dict[str, Any]]:
    """LP relaxation rounded up (always feasible: every coefficient saves memory) and lowered
    again; accepted when it is within ``mip_gap`` of the LP bound, else HiGHS branch and bound.
    If the MILP hits its time limit, the better of its incumbent and the rounded answer is used."""
    nvars = len(problem.upper)
    form = LinearForm.of(problem)
    relaxed = relaxation(form, time_limit_s)
    if relaxed.x is not None:
        rounded = np.minimum(np.ceil(relaxed.x[:nvars] - 1e-6), problem.upper)
        rounded = greedy(problem, rounded) if (problem.deficit(rounded) > _FEAS_TOL).any() else rounded
    else:  # from full recompute, which fits: raising from none one layer at a time takes hours on a big plan
        rounded = problem.upper.copy()
    rounded = descend(problem, rounded)
    heuristic = float(rounded @ problem.weight_ms)
    if relaxed.x is not None and heuristic - relaxed.value <= mip_gap * heuristic + 1e-9 * max(heuristic, 1.0):
        return rounded, {"status": "optimal", "method": "lp_rounding", "lp_bound_ms": relaxed.value,
                         "greedy_fallback": False}
    if relaxed.status == "time_limit":  # branch and bound starts from this LP: it would spend the limit again
        return rounded, {"status": "time_limit", "method": "descend_from_full", "greedy_fallback": True}

    constraints = [LinearConstraint(form.memory, lb=form.need, ub=np.inf)]
    if form.link.shape[0]:
        constraints.append(LinearConstraint(form.link, lb=-np.inf, ub=0.0))
    integrality = (np.arange(len(form.objective)) < form.integers).astype(float)
    res = milp(form.objective, constraints=constraints, integrality=integrality,
               bounds=Bounds(np.zeros(len(form.upper)), form.upper),
               options={"time_limit": time_limit_s, "disp": False, "mip_rel_gap": mip_gap})
    info: dict[str, Any] = {"status": _STATUS.get(res.status, str(res.status)), "method": "branch_and_bound",
                            "greedy_fallback": False}
    if relaxed.x is not None:
        info["lp_bound_ms"] = relaxed.value
    if res.x is None:
        info["greedy_fallback"] = True
        return rounded, info
    c = np.clip(np.round(res.x[:nvars]), 0, problem.upper)
    if (problem.deficit(c) > _FEAS_TOL).any():
        info["greedy_repair"] = True
        c = descend(problem, greedy(problem, c))
    if res.status != 0 and heuristic < c @ problem.weight_ms:
        info["greedy_fallback"] = True
        c = rounded
    return c, info


_STATUS = {0: "optimal", 1: "time_limit", 2: "infeasible", 3: "unbounded", 4: "error"}


class Relaxed(NamedTuple):
    """An LP relaxation's answer: ``x`` is None where HiGHS found no optimum, and ``status`` says
    why (``"time_limit"``, or HiGHS's own word)."""

    x: np.ndarray | None
    value: float
    status: str


def relaxation(form: LinearForm, time_limit_s: float) -> Relaxed:
    """The LP relaxation of ``form`` by row generation.

    A few hundred of a plan's thousands of windows bind at the optimum (those at a stage's peak),
    so the LP starts from none and takes in the most violated windows a round at a time, each
    round warm-started from the last basis by dual simplex, until the answer satisfies every
    window: the same optimum as the whole LP, about twice as fast on EPP's screens.
    """
    n = len(form.objective)
    h = _highs()
    h.setOptionValue("time_limit", float(time_limit_s))
    h.addVars(n, np.zeros(n), form.upper)
    h.changeColsCost(n, np.arange(n, dtype=np.int32), form.objective)
    if form.link.shape[0]:
        _add_rows(h, form.link, np.full(form.link.shape[0], -highspy.kHighsInf), np.zeros(form.link.shape[0]))
    taken = np.zeros(len(form.need), dtype=bool)
    x = np.zeros(n)
    while True:
        short = form.need - form.memory @ x
        candidates = np.flatnonzero((short > _ROW_TOL) & ~taken)
        if not len(candidates):
            return Relaxed(x, float(form.objective @ x), "optimal")
        rows = np.sort(candidates[np.argsort(-short[candidates])[:_ROWS_PER_ROUND]])
        taken[rows] = True
        _add_rows(h, form.memory[rows], form.need[rows], np.full(len(rows), highspy.kHighsInf))
        h.run()
        status = h.getModelStatus()
        if status != highspy.HighsModelStatus.kOptimal:
            timed_out = status == highspy.HighsModelStatus.kTimeLimit
            return Relaxed(None, math.nan, "time_limit" if timed_out else h.modelStatusToString(status))
        x = np.asarray(h.getSolution().col_value)


def _add_rows(h: highspy.Highs, a: csr_matrix, lower: np.ndarray, upper: np.ndarray) -> None:
    a = a.tocsr()
    h.addRows(a.shape[0], lower, upper, a.nnz, a.indptr[:-1].astype(np.int32), a.indices.astype(np.int32), a.data)


def _highs() -> highspy.Highs:
    _banner_printed()
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("presolve", "off")  # costs these small LPs more than it saves
    h.setOptionValue("simplex_dual_edge_weight_strategy", 1)  # Devex: 15% fewer seconds than steepest edge here
    return h


@functools.cache
def _banner_printed() -> None:
    """HiGHS prints a banner on the C stdout when the first `highspy.Highs` of a process is made;
    that one is made here with the descriptor pointed at the null device, so planning prints
    nothing."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _solve(plan, cost, memory_budget, mip_gap, time_limit_s, cache):
    """Checked arguments, the problem and its solution: what both public entry points share."""
    if not 0 <= mip_gap < 1:
        raise ValueError(f"mip_gap must be in [0, 1), got {mip_gap}")
    if time_limit_s <= 0:
        raise ValueError(f"time_limit_s must be positive, got {time_limit_s}")
    pp = build_problem(plan, cost, memory_budget, cache)
    check_full_recompute(pp)
    c, infos = _solve_parts(pp.problem, mip_gap, time_limit_s, cache)
    return pp, c, infos


def solve_checkpointing(
    plan: Plan,
    cost: CostModel,
    memory_budget: float | Sequence[float],
    mip_gap: float = 0.02,
    time_limit_s: float = 10.0,
    cache: SolverCache | None = None,
) -> Plan:
    """Return ``plan`` with every action's ``recompute_layers`` set by the checkpointing ILP.

    ``memory_budget`` is one budget for all stages or one per stage. ``cache`` reuses cost terms
    and answers of identical problems. Raises `InfeasibleMemoryError` when a window cannot fit even
    with every layer recomputed.
    """
    pp, c, infos = _solve(plan, cost, memory_budget, mip_gap, time_limit_s, cache)
    return apply_solution(pp, c, {
        "status": _worst_status([i["status"] for i in infos]),
        "solver": "highs",
        "greedy_fallback": any(i["greedy_fallback"] for i in infos),
        "greedy_repair": any(i.get("greedy_repair", False) for i in infos),
        "cached_parts": sum(bool(i.get("cached")) for i in infos),
        "parts": len(infos),
        "mip_gap": mip_gap,
        "lp_bound_ms": math.fsum(i.get("lp_bound_ms", 0.0) for i in infos),  # parts without one: 0, still a bound
        "time_limit_s": time_limit_s,
    })


def min_recompute_ms(
    plan: Plan,
    cost: CostModel,
    memory_budget: float | Sequence[float],
    mip_gap: float = 0.02,
    time_limit_s: float = 10.0,
    cache: SolverCache | None = None,
) -> float:
    """The objective `solve_checkpointing` would reach, without building the plan: what the
    grouping search needs for each candidate pipeline. Shares ``cache`` with it."""
    pp, c, _ = _solve(plan, cost, memory_budget, mip_gap, time_limit_s, cache)
    return float(c @ pp.problem.weight_ms)


def _solve_parts(problem: CheckpointProblem, mip_gap: float, time_limit_s: float,
                 cache: SolverCache | None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Solve each independent part (from ``cache`` where an identical one was solved before)."""
    solutions = (cache if cache is not None else SolverCache()).solutions
    c = np.zeros(len(problem.upper))
    infos = []
    for var_ids, part in problem.parts():
        key = (part.key, mip_gap)
        if key in solutions:
            sol, info = solutions[key]
            info = {**info, "cached": True}
        else:
            sol, info = solve_problem(part, mip_gap, time_limit_s)
            solutions[key] = (sol, info)
        c[var_ids] = sol
        infos.append(info)
    return c, infos


def _worst_status(statuses: list[str]) -> str:
    if not statuses:
        return "no_recompute_needed"
    for s in ("time_limit", "error", "infeasible", "unbounded"):
        if s in statuses:
            return s
    return "optimal"


def apply_solution(pp: PlanProblem, c: np.ndarray, info: dict[str, Any]) -> Plan:
    plan = pp.plan
    layers = plan.layers_per_stage

    def action(s: int, a: Action) -> Action:
        v = pp.var_of[(s, a.chunk_id)]
        r = int(min(c[v], layers[s]))
        u = int(min(c[v + pp.elementwise_of], layers[s])) if pp.elementwise_of else r
        f = int(pp.offload.stages[s].layers[a.chunk_id]) if pp.offload is not None else 0
        lead = int(pp.offload.stages[s].lead[a.chunk_id]) if f and a.kind == "B" else 0
        return Action(a.kind, a.chunk_id, r, u - r, f, lead)

    stage_actions = tuple(tuple(action(s, a) for a in actions) for s, actions in enumerate(plan.stage_actions))
    _, offsets = diagonal_variables(plan)
    diagonals = pp.elementwise_of or len(c)
    bounds = offsets[1:] + [diagonals]
    meta = {
        **info,
        "objective_ms": float(c @ pp.problem.weight_ms),
        "windows": len(pp.windows),
        "variables": len(c),
        "diagonal_layers": [[int(x) for x in c[lo:hi]] for lo, hi in zip(offsets, bounds)],
    }
    if pp.elementwise_of:
        meta["diagonal_elementwise_layers"] = [[int(x) for x in c[lo + diagonals:hi + diagonals] - c[lo:hi]]
                                               for lo, hi in zip(offsets, bounds)]
    extra = {}
    if pp.offload is not None and any(pp.offload.optimizer_out_s):
        extra["optimizer_reload_lead"] = list(pp.offload.optimizer_back_lead)
    return dataclasses.replace(plan, stage_actions=stage_actions,
                               metadata={**plan.metadata, "checkpointing": meta, **extra})


def recompute_time_ms(plan: Plan, cost: CostModel) -> float:
    """Sum over stages and chunks of the recompute the plan asks for."""
    shapes = [ChunkShape.of(c, plan.seq_lengths) for c in plan.chunks]
    return math.fsum(cost.recompute_ms(shapes[a.chunk_id], a.recompute_layers, a.elementwise_layers)
                     for actions in plan.stage_actions for a in actions if a.kind == "B")
