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

The formulation (windows, rows, the host tier's share) is `ilp_problem`; this module solves it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import highspy
import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix

from ..contract.cost import CostModel
from ..contract.ir import Action, Plan
from ..contract.shapes import ChunkShape
from ..contract.units import GIB
from .ilp_problem import (
    FEAS_TOL,
    CheckpointProblem,
    PlanProblem,
    SolverCache,
    build_problem,
    check_full_recompute,
    diagonal_variables,
)

_ROWS_PER_ROUND = 100  # most violated windows the LP relaxation takes in per round
_ROW_TOL = 1e-9  # GiB: a window short by less is not taken in (rounding and `greedy` settle it)


def greedy(problem: CheckpointProblem, start: np.ndarray | None = None) -> np.ndarray:
    """Raise diagonals one layer at a time, best memory saved per millisecond first, until all fit.
    A diagonal's ``r`` at its ``u`` rises together with it (one more layer recomputed whole)."""
    c = np.zeros(len(problem.upper)) if start is None else start.astype(float).copy()
    r_var, u_var = problem.ties.T
    while True:
        deficit = problem.deficit(c)
        violated = deficit > FEAS_TOL
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
            if np.any(slack[rows] - loss < -FEAS_TOL):
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
        rounded = greedy(problem, rounded) if (problem.deficit(rounded) > FEAS_TOL).any() else rounded
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
    if (problem.deficit(c) > FEAS_TOL).any():
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
        if a.kind == "W":  # its backward recomputes and reloads
            return a
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
        if any(pp.offload.optimizer_out_wait):
            extra["optimizer_out_wait"] = list(pp.offload.optimizer_out_wait)
    return dataclasses.replace(plan, stage_actions=stage_actions,
                               metadata={**plan.metadata, "checkpointing": meta, **extra})


def recompute_time_ms(plan: Plan, cost: CostModel) -> float:
    """Sum over stages and chunks of the recompute the plan asks for."""
    shapes = [ChunkShape.of(c, plan.seq_lengths) for c in plan.chunks]
    return math.fsum(cost.recompute_ms(shapes[a.chunk_id], a.recompute_layers, a.elementwise_layers)
                     for actions in plan.stage_actions for a in actions if a.kind == "B")
