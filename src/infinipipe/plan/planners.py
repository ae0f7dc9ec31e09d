"""Planner registry: every planner maps the same `PlanRequest` to a `Plan`.

EPP and the baselines share the request, the schedule checker and the simulator, so any
difference between them comes from chunking, ordering and checkpointing alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..sim.simulator import LinkModel
from . import baselines
from .cost import CostModel
from .ir import Plan
from .layers import balance_layers


@dataclass(frozen=True)
class PlanRequest:
    """One global batch to plan: sequence lengths, cost model, pipeline depth and device memory."""

    lengths: Sequence[int]
    cost: CostModel
    num_stages: int
    memory_bytes: float
    layers_per_stage: Sequence[int] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    link: LinkModel = LinkModel()

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))
        object.__setattr__(self, "options", dict(self.options))
        if not self.lengths:
            raise ValueError("lengths: the batch has no sequences")
        if min(self.lengths) < 1:
            raise ValueError(f"lengths: every sequence needs at least one token, got {min(self.lengths)}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if self.memory_bytes <= 0:
            raise ValueError(f"memory_bytes must be > 0, got {self.memory_bytes}")
        if self.layers_per_stage is None:
            object.__setattr__(self, "layers_per_stage", balance_layers(self.cost, self.num_stages))
        else:
            layers = tuple(int(n) for n in self.layers_per_stage)
            object.__setattr__(self, "layers_per_stage", layers)
            if len(layers) != self.num_stages:
                raise ValueError(f"layers_per_stage has {len(layers)} entries for {self.num_stages} stages")
            if min(layers) < 1 or sum(layers) != self.cost.model.layers:
                raise ValueError(
                    f"layers_per_stage {layers} must be >= 1 each and sum to the model's {self.cost.model.layers} layers"
                )

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.layers_per_stage or ())

    def activation_capacity(self, stage: int) -> float:
        """Bytes left for activations on ``stage`` once its model states are resident."""
        last = self.num_stages - 1
        return self.memory_bytes - self.cost.model_state_bytes(self.layers[stage], stage == 0, stage == last)

    def option(self, name: str, default: Any) -> Any:
        return self.options.get(name, default)


def _epp(checkpointing: str) -> Callable[[PlanRequest], Plan]:
    def run(request: PlanRequest) -> Plan:
        try:
            from .epp import plan_epp
        except ImportError as exc:
            raise ValueError(f"the EPP planner is not available in this build ({exc})") from None
        return plan_epp(request, checkpointing=checkpointing)
    return run


PLANNERS: dict[str, Callable[[PlanRequest], Plan]] = {
    "epp": _epp("ilp"),
    "epp-no-ckpt": _epp("none"),
    "epp-full-ckpt": _epp("full"),
    "epp-uniform": baselines.plan_epp_uniform,
    "seq1f1b": baselines.plan_seq1f1b,
    "batch-1f1b": baselines.plan_batch_1f1b,
    "gpipe": baselines.plan_gpipe,
}


def make_plan(name: str, request: PlanRequest) -> Plan:
    try:
        planner = PLANNERS[name]
    except KeyError:
        raise ValueError(f"unknown planner {name!r}; known: {', '.join(sorted(PLANNERS))}") from None
    return planner(request)
