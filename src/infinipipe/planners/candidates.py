"""What EPP's search plans and remembers: candidate chunkings, their trials, and the winner's
choices a later step's search starts from (`WarmStart`)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from ..contract.ir import Plan
from ..sim.simulator import SimResult
from .ilp_problem import InfeasibleMemoryError
from .schedule import Order

Family = Literal["epp", "fixed", "balanced", "whole", "composite", "frugal"]
COMPOSITE_RULES = ("capped", "half")  # which sequences a composite plans alone: those at the cap, or of half its length


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way of cutting the batch into chunks that the search plans, checkpoints and simulates.

    ``epp``: Algorithm 1 with ``size`` = K equal-time slices of the longest sequence and chunks
    of at most ``token_capacity`` tokens; ``fixed``: every sequence cut at ``size`` tokens, short
    ones packed (the ``seq1f1b`` and ``epp-uniform`` family); ``balanced``: Seq1F1B's own
    equal-compute partition into ``size`` slices; ``whole``: whole sequences packed into chunks
    of at most ``size`` tokens (the ``batch-1f1b`` family); ``composite``: ``size`` sequences
    picked by ``rule`` each planned alone, the rest together; ``frugal``: `frugal_plan`.
    ``order``: how each pipeline's chunks are ordered (`Order`).
    """

    family: Family
    size: int
    token_capacity: int = 0
    order: Order = Order()
    rule: str = ""

    @property
    def label(self) -> str:
        return self._label + ("" if self.order.kind == "1f1b" else f" {self.order.label}")

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

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Candidate":
        """Also reads a record written before orders had a kind (``interleave``: true or false)."""
        fields = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        fields["order"] = Order.from_json(data.get("order")) if "order" in data else (
            Order("interleaved") if data.get("interleave") else Order())
        return cls(**fields)


@dataclasses.dataclass
class Trial:
    """One candidate planned: ``screened`` (one or two pipelines, loose ILP gap) or in full.
    ``floor_s``: where it was pruned unplanned, its time without any recompute (no plan of it is
    faster)."""

    candidate: Candidate
    screened: bool
    plan: Plan | None
    sim: SimResult | None
    error: str = ""
    seconds: float = 0.0
    memory_error: InfeasibleMemoryError | None = None
    largest_chunk: int = 0
    floor_s: float = math.inf

    @property
    def feasible(self) -> bool:
        return self.sim is not None and self.sim.feasible

    def reach_s(self) -> float:
        """The fastest this candidate could be: its time where it was planned and fits, else its
        pruning floor (infinite where neither is known)."""
        return self.sim.iteration_time_s if self.feasible else self.floor_s

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


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """The previous step's winning choices, which the next search tries (with their neighbours)
    before anything else: consecutive batches of one corpus look alike, so the last winner is
    the likeliest one, and a deadline then cuts only the unlikely rest.

    ``choice`` won the whole batch; where it is a composite, ``alone`` won its longest
    one-sequence part and ``rest`` the part of the remaining sequences."""

    choice: Candidate | None = None
    alone: Candidate | None = None
    rest: Candidate | None = None

    def for_part(self, single: bool) -> "WarmStart":
        """What a search of one part of a composite starts from."""
        return WarmStart(self.alone if single else self.rest)

    @classmethod
    def from_plan(cls, plan: Plan) -> "WarmStart":
        """The choices an EPP plan's metadata records (empty for other planners' plans)."""
        return cls.from_plan_metadata(plan.metadata)

    @classmethod
    def from_plan_metadata(cls, meta: dict[str, Any]) -> "WarmStart":
        won = meta.get("winner")
        parts = meta.get("part_winners", {})
        pick = {k: Candidate.from_json(v) for k, v in parts.items() if v}
        return cls(Candidate.from_json(won) if won else None, pick.get("alone"), pick.get("rest"))
