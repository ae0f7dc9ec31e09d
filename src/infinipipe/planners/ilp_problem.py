"""The checkpointing ILP's formulation: one plan's windows and their memory rows.

Every in-flight window of every stage (the chunks held while one action runs) is a row: what the
window holds without recompute, less the budget, must be saved by the layers its chunks
recompute, which are the diagonal variables of `diagonal_variables` (and, with elementwise
recompute, their second integer). Each entry saves a fixed number of bytes per layer up to a cap,
so a row is concave in the variables and every coefficient saves memory. The host tier
(`offload.plan_offload`) is settled first: a chunk whose offloaded layers are on the host in a
window holds none of their bytes there and its recompute saves only on its other layers.
`ilp` solves what is built here.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..contract.cost import CostModel
from ..contract.ir import Plan
from ..contract.shapes import ChunkShape
from ..contract.units import format_bytes
from ..sim.host_schedule import action_starts
from ..sim.simulator import deferred_bytes, deferred_weight_store, gradient_store_bytes
from .offload import Offload, plan_offload
from .schedule import plan_order

FEAS_TOL = 1.0  # bytes: slack allowed when checking a rounded solution


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
    backward = np.fromiter((a.kind == "B" for a in actions), dtype=bool, count=len(actions))
    at = np.arange(len(actions))
    f_at = np.zeros(len(plan.chunks), dtype=np.int64)
    b_at = np.zeros(len(plan.chunks), dtype=np.int64)
    f_at[own[forward]] = at[forward]
    b_at[own[backward]] = at[backward]
    held = own[forward]  # chunks in forward order
    span = b_at[held] - f_at[held] + 1
    window = np.repeat(f_at[held] - np.cumsum(span) + span, span) + np.arange(int(span.sum()))
    chunk = np.repeat(held, span)
    order = np.argsort(window, kind="stable")  # stable: forward order inside each window
    lens = np.bincount(window, minlength=len(actions))
    return lens, chunk[order], own, forward


def diagonal_variables(plan: Plan) -> tuple[dict[tuple[int, int], int], list[int]]:
    """Map each (stage, chunk) to its variable; return also each pipeline's variable offset.

    In a 1F1B order a variable is a diagonal; in a timed order (`Order.shares_diagonals` false)
    each stage interleaves its own way, so every (stage, chunk) gets a variable of its own. Either
    way stage ``s``'s variable is the last stage's plus ``last - s`` (`build_problem` relies on it):
    a timed order numbers a chunk's stages side by side."""
    num_stages = plan.num_stages
    stride = 1 if plan_order(plan).shares_diagonals else num_stages
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
                var_of[(s, cid)] = offset + pos * stride + (num_stages - 1 - s)
        offset += (len(order) - 1) * stride + num_stages
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
           plan_order(plan).shares_diagonals,
           tuple(tuple((a.kind, a.chunk_id) for a in actions) for actions in plan.stage_actions))
    if key in cache.problems:
        return dataclasses.replace(cache.problems[key], plan=plan)
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

    by_role: dict[tuple[int, bool, bool], list[np.ndarray]] = {}
    stages, binding = [], []  # per stage: its windows, and those over budget with nothing recomputed or offloaded
    for s in range(num_stages):
        first, last, n_l = s == 0, s == num_stages - 1, layers[s]
        if (n_l, first, last) not in by_role:  # stages alike in role and layers share their terms
            by_role[(n_l, first, last)] = [np.array(col) for col in zip(*(memory_terms(sh, n_l, first, last) for sh in shapes))]
        base, per_layer, fwd_work, _, bwd_work, *_ = by_role[(n_l, first, last)]
        lens, flat, own, forward = stage_windows(plan, s)
        row = np.repeat(np.arange(len(lens)), lens)
        weights = np.fromiter((a.kind == "W" for a in plan.stage_actions[s]), dtype=bool, count=len(own))
        # A deferring backward's stash grows as its layers run (`simulate`), taken at full recompute.
        stash, fresh = (a[own] * (~forward & ~weights) for a in deferred_bytes(plan, s, cost, shapes))
        growth = np.where(stash > 0, np.maximum((n_l - 1) / n_l * (stash - base[own] + n_l * per_layer[own]), 0.0)
                          + fresh, 0.0)
        work = np.where(forward, fwd_work[own], np.where(weights, 0.0, bwd_work[own])) + growth
        # Constant per window: split sequences' dK/dV and what deferred weight gradients keep.
        grads = gradient_store_bytes(plan, s, cost, shapes)[0] + deferred_weight_store(plan, s, cost, shapes)
        stages.append((lens, flat, own, forward, weights, row, work, grads))
        binding.append(cost.model_state_bytes(n_l, first, last) + work + grads
                       + np.bincount(row, weights=base[flat], minlength=len(lens)) > budgets[s])
    offload = plan_offload(plan, cost, shapes, binding, memo)

    act_bytes = np.array([term(cost.layer_act_bytes, sh) for sh in shapes])
    ckpt_bytes = np.array([term(cost.ckpt_layer_bytes, sh) for sh in shapes])
    back_leads: list[int | None] = list(offload.optimizer_back_lead) if offload is not None else []
    out_waits = [False] * num_stages
    n_rows = 0
    win_stage, win_start, win_len, win_flat, win_own, win_fwd = [], [], [], [], [], []
    need, full_mem, rows, cols, slope, lcap = [], [], [], [], [], []
    flat_seen = 0  # length of win_flat so far
    for s in range(num_stages):
        first, last, n_l = s == 0, s == num_stages - 1, layers[s]
        base, per_layer, fwd_work, fwd_extra, bwd_work, bwd_extra, e_slope, fwd_e_extra, bwd_e_extra = \
            by_role[(n_l, first, last)]
        states = cost.model_state_bytes(n_l, first, last)
        lens, flat, own, forward, weights, row, work, grads = stages[s]
        # Added at its own full recompute, and at elementwise with none stored; a W rematerialises nothing.
        extra = np.where(weights, 0.0, np.where(forward, fwd_extra[own], bwd_extra[own]))
        e_extra = np.where(weights, 0.0, np.where(forward, fwd_e_extra[own], bwd_e_extra[own]))
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
            states = states + _optimizer_on_device(plan, cost, s, shapes, offload, least, budgets[s], back_leads,
                                                   out_waits, memo)
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
        offload = dataclasses.replace(offload, optimizer_back_lead=tuple(back_leads), optimizer_out_wait=tuple(out_waits))
    cache.problems[key] = PlanProblem(plan=plan, var_of=var_of, windows=windows, full_memory=cat(full_mem, float),
                                      budgets=budgets, problem=problem, elementwise_of=u_of,
                                      offload=offload)
    return cache.problems[key]


def _optimizer_on_device(plan: Plan, cost: CostModel, stage: int, shapes: list[ChunkShape], offload: Offload,
                         least: np.ndarray, budget: float, back_leads: list[int], out_waits: list[bool],
                         memo: dict) -> np.ndarray:
    """Per action of ``stage``: the optimizer state on the device while it runs, where the state
    waits on the host: until its copy out ends (`Offload.optimizer_out_s`; actions back to back
    start no later than they do) and again from the start of its copy back, which begins
    `Offload.optimizer_back_lead` actions before the stage's end, or later where the last
    actions could not hold it even at their ``least`` memory (full recompute): at the latest,
    after the stage's last action (``back_leads[stage]`` is set to the lead used). Symmetrically,
    where the actions the copy out overlaps could not hold it at their least memory, the stage's
    first action waits for the copy out to end (``out_waits[stage]``), which no action then
    overlaps: a second or so of the step's start against a plan that has no room for the state
    beside the batch's longest chunks (which run first). A stage whose step is too short for the
    round trip (lead None) keeps the state all step."""
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
    overlaps = start < offload.optimizer_out_s[stage]
    out_waits[stage] = bool(overlaps.any() and least[overlaps].max() + opt > budget)
    on_device = np.where(overlaps & (not out_waits[stage]), opt, 0.0)
    on_device[len(actions) - lead:] = opt if lead else 0.0  # copied back for the optimizer step
    return on_device


def check_full_recompute(pp: PlanProblem) -> None:
    """Raise `InfeasibleMemoryError` for the worst window that full recompute cannot fit."""
    if not pp.windows:
        return
    over = pp.full_memory - pp.budgets[pp.windows.stages]
    worst = int(np.argmax(over))
    if over[worst] <= FEAS_TOL:
        return
    stage = pp.windows[worst].stage
    on_stage = np.flatnonzero(pp.windows.stages == stage)
    raise InfeasibleMemoryError(
        stage=stage,
        window=pp.windows[worst].chunks,
        min_memory_bytes=float(max(pp.full_memory[i] for i in on_stage)),
        budget=float(pp.budgets[stage]),
    )
