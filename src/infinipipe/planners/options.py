"""Planner options: one typed dataclass, one default per knob, read by every planner.

The same fields are the ``[epp]`` section of a run's TOML (the config section extends this class)
and the ``--option key=value`` words of ``infinipipe plan``, so a knob set anywhere means the
same thing and has the same default everywhere.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ..contract.typed_fields import build_typed

BEHIND_A_STEP: dict[str, Any] = {"deadline_share": 0.1, "pool_size": -1}
"""Where a plan hides behind a training step (a run, `infinipipe plan`, `bench`): a tenth of
the step for the search, and a pool on the cores the training ranks leave."""


@dataclass(frozen=True)
class PlannerOptions:
    """Knobs of the planners; ``None`` means "search" (or "derive") rather than a fixed value.

    EPP: ``num_slices`` fixes the slice count K of the longest sequence, else K is searched in
    ``min_slices..max_slices``; ``token_capacity`` caps a chunk's tokens (None: derived from the
    memory budget); ``mip_gap`` is the final ILP's relative gap (a screened winner is re-solved at
    it only where the screening answer could be more than ``mip_gap`` of the iteration from the
    optimum) and ``screen_gap`` the looser gap used while screening candidates; ``time_limit_s``
    bounds each ILP solve; grouping tries up to ``max_pipelines`` pipelines over ``max_cuts`` cut
    points; ``refine_top`` candidates get the full grouping search; ``refine_rounds`` bisection
    rounds refine the K ladder.
    Planning time: ``deadline_s`` seconds of wall time, else ``deadline_share`` of the step the
    plan hides behind (`PlanRequest.step_s`, else the best plan's simulated time), after which
    the search starts nothing new once a plan fits (0: no deadline; a plan then depends on its
    inputs only); ``pool_size`` processes plan candidates side by side (0: the planning process
    alone; -1: the cores the training ranks leave, `search_pool.auto_pool_size`). The library's
    defaults give plans that depend on their inputs only; a run's ``[epp]`` section and the
    ``plan`` and ``bench`` commands plan behind a step, with a deadline and a pool
    (`BEHIND_A_STEP`).
    Baselines: ``recompute`` fixes their uniform recompute layer count (None: the smallest that
    fits); ``micro_batch_tokens`` is the packing budget of ``batch-1f1b``/``gpipe`` (None: the
    longest sequence); ``chunk_tokens`` fixes ``seq1f1b``'s chunk size (None: the fastest fitting
    power of two); ``epp-uniform`` reads ``num_slices`` as EPP does.
    """

    num_slices: int | None = None
    min_slices: int = 1
    max_slices: int = 64
    token_capacity: int | None = None
    mip_gap: float = 0.02
    screen_gap: float = 0.1
    time_limit_s: float = 5.0
    max_pipelines: int = 3
    max_cuts: int = 8
    refine_top: int = 1
    refine_rounds: int = 1
    recompute: int | None = None
    micro_batch_tokens: int | None = None
    chunk_tokens: int | None = None
    deadline_s: float | None = None
    deadline_share: float = 0.0
    pool_size: int = 0
    # The search also reorders its best plans in timed orders with W actions (`timed_order`);
    # false keeps to 1F1B and interleaved orders.
    timed_orders: bool = True

    FIELD_PREFIX: ClassVar[str] = ""  # how error messages name a field ("epp." in a run config)

    def __post_init__(self) -> None:
        for name in ("min_slices", "max_slices", "max_pipelines", "max_cuts"):
            self._at_least(name, getattr(self, name), 1)
        for name in ("num_slices", "token_capacity", "micro_batch_tokens", "chunk_tokens"):
            if getattr(self, name) is not None:
                self._at_least(name, getattr(self, name), 1)
        for name in ("refine_top", "refine_rounds"):
            self._at_least(name, getattr(self, name), 0)
        if self.recompute is not None:
            self._at_least("recompute", self.recompute, 0)
        if self.max_slices < self.min_slices:
            raise ValueError(f"{self.FIELD_PREFIX}max_slices ({self.max_slices}) must be >= "
                             f"{self.FIELD_PREFIX}min_slices ({self.min_slices})")
        for name in ("mip_gap", "screen_gap"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{self.FIELD_PREFIX}{name} must be in [0, 1), got {getattr(self, name)}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ValueError(f"{self.FIELD_PREFIX}deadline_s must be > 0 (or unset), got {self.deadline_s}")
        if not self.deadline_share >= 0:
            raise ValueError(f"{self.FIELD_PREFIX}deadline_share must be >= 0 (0: no deadline), got {self.deadline_share}")
        self._at_least("pool_size", self.pool_size, -1)
        if not self.time_limit_s > 0:
            raise ValueError(f"{self.FIELD_PREFIX}time_limit_s must be > 0, got {self.time_limit_s}")

    def _at_least(self, name: str, value: float, low: float) -> None:
        if value < low:
            raise ValueError(f"{self.FIELD_PREFIX}{name} must be >= {low}, got {value}")

    def planner_options(self) -> "PlannerOptions":
        """Just the planner knobs (a run config's ``[epp]`` section carries more)."""
        return PlannerOptions(**{f.name: getattr(self, f.name) for f in fields(PlannerOptions)})

    @classmethod
    def behind_a_step(cls, values: Mapping[str, Any] | None = None) -> "PlannerOptions":
        """Options from plain values over `BEHIND_A_STEP`: what the commands plan with."""
        return cls.from_mapping({**BEHIND_A_STEP, **(values or {})})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "PlannerOptions":
        """Options from plain values (``--option`` words, JSON), each checked against its type."""
        return build_typed(cls, values, "option ")
