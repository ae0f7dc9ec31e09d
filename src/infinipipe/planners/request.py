"""What every planner is asked: one global batch, its cost model, the pipeline and the memory budget."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..contract.cost import CostModel
from ..contract.layout import LinkModel
from .candidates import WarmStart
from .options import PlannerOptions
from .stage_layers import balance_layers


@dataclass(frozen=True)
class PlanRequest:
    """One global batch to plan. ``memory_budget`` is bytes per device; ``layers_per_stage``
    defaults to the cost-balanced split; ``link``, every stage hop's, to the cost model's layout's.
    ``step_s`` is the measured time of the training step the planning hides behind (the base of
    a ``deadline_share``), ``warm`` the previous step's winning choices, where a trainer knows them.
    ``host_memory_budget`` is the host memory per device that offloaded tensors and the optimizer
    state may fill (0: no host tier; planners that do not offload ignore it)."""

    lengths: Sequence[int]
    cost: CostModel
    num_stages: int
    memory_budget: float
    layers_per_stage: Sequence[int] | None = None
    options: PlannerOptions = field(default_factory=PlannerOptions)
    link: LinkModel | None = None
    step_s: float | None = None
    warm: WarmStart | None = None
    host_memory_budget: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))
        if not isinstance(self.options, PlannerOptions):
            raise TypeError(f"options must be PlannerOptions, got {type(self.options).__name__} "
                            "(PlannerOptions.from_mapping reads plain values)")
        if not self.lengths:
            raise ValueError("lengths: the batch has no sequences")
        if min(self.lengths) < 1:
            raise ValueError(f"lengths: every sequence needs at least one token, got {min(self.lengths)}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if self.memory_budget <= 0:
            raise ValueError(f"memory_budget must be > 0 bytes, got {self.memory_budget}")
        if not self.host_memory_budget >= 0:
            raise ValueError(f"host_memory_budget must be >= 0 bytes (0: no host tier), got {self.host_memory_budget}")
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

    def with_host_tier(self) -> "PlanRequest":
        """The request with its cost model on the host tier (`CostModel.with_host_tier`): what a
        planner that offloads plans with."""
        return dataclasses.replace(self, cost=self.cost.with_host_tier(self.host_memory_budget, self.layers))
