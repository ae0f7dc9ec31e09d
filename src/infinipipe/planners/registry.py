"""Planner registry: every planner maps the same `PlanRequest` to a `Plan`.

EPP and the baselines share the request, the schedule checker and the simulator, so any
difference between them comes from chunking, ordering and checkpointing alone. The
sequence-parallel baselines (no pipeline) are `SP_PLANNERS`: they take the whole cluster's GPU
count and return an `SPPlan` of SP groups, each a one-stage Plan on the same simulator.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

from ..contract.ir import Plan
from . import baselines, sp_baselines
from .epp import plan_epp
from .request import PlanRequest

PLANNERS: dict[str, Callable[[PlanRequest], Plan]] = {
    "epp": partial(plan_epp, checkpointing="ilp"),
    "epp-no-ckpt": partial(plan_epp, checkpointing="none"),
    "epp-full-ckpt": partial(plan_epp, checkpointing="full"),
    "epp-uniform": baselines.plan_epp_uniform,
    "seq1f1b": baselines.plan_seq1f1b,
    "seq1f1b-balanced": baselines.plan_seq1f1b_balanced,
    "batch-1f1b": baselines.plan_batch_1f1b,
    "gpipe": baselines.plan_gpipe,
}

SP_PLANNERS: dict[str, Callable[..., sp_baselines.SPPlan]] = {
    "ulysses": sp_baselines.plan_ulysses,
    "flexsp": sp_baselines.plan_flexsp,
}


def make_plan(name: str, request: PlanRequest) -> Plan:
    try:
        planner = PLANNERS[name]
    except KeyError:
        raise ValueError(f"unknown planner {name!r}; known: {', '.join(sorted(PLANNERS))}") from None
    return planner(request)
