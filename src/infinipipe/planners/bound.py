"""A lower bound on the memory per device that any plan of a batch needs.

Whatever the chunking, schedule and checkpointing, the longest sequence must pass every stage:
- split into slices, all of its slices are in flight when its backward begins (its last slice's),
  each holding at least its checkpointed layer inputs and stage output, beside its whole-length
  K/V store and that store's dK/dV, which the backward allocates;
- whole, its one chunk's backward holds those inputs and rematerialises a layer.
The smaller of the two, plus the stage's model states, is what the stage cannot do without. A
budget under the bound has no plan; `plan_epp` refuses it at once and names the stage. With a
host tier (`CostModel.host_budget`) a split sequence's checkpoints may wait on the host, so only
its K/V store and dK/dV count, and the states are those kept on the device through the step; but
the optimizer steps on the device, so a stage needs at least its whole model states once a step.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..contract.cost import CostModel
from ..contract.shapes import ChunkShape
from ..contract.units import format_bytes


@dataclass(frozen=True)
class MemoryBound:
    """The bound's worst stage: ``states`` + ``sequence`` bytes of a ``length``-token sequence
    (``split``: its slices at full recompute, its K/V store and dK/dV; else whole at full recompute)."""

    stage: int
    states: float
    sequence: float
    length: int
    split: bool
    optimizer: float = 0.0  # the optimizer state the host tier takes off for the step (0 without one)

    @property
    def bytes(self) -> float:
        return max(self.states + self.sequence, self.states + self.optimizer)

    def __str__(self) -> str:
        if self.optimizer >= self.sequence:
            return (f"any plan needs at least {format_bytes(self.bytes)} per device (stage {self.stage}: its "
                    f"{format_bytes(self.bytes)} of model states, optimizer state included, which the optimizer "
                    "step reads on the device)")
        how = ("its slices' checkpoints with its K/V store and dK/dV" if self.split
               else "its checkpoints and one rematerialised layer")
        return (f"any plan needs at least {format_bytes(self.bytes)} per device (stage {self.stage}: "
                f"{format_bytes(self.states)} of model states + {format_bytes(self.sequence)} for the "
                f"{self.length:,}-token sequence at full recompute, {how})")


def memory_lower_bound(cost: CostModel, layers: Sequence[int], lengths: Sequence[int]) -> MemoryBound:
    """The bound of the batch ``lengths`` on stages of ``layers`` layers: its worst stage."""
    longest = max(lengths)
    whole = ChunkShape((longest,))
    store = ChunkShape((longest,), kept=longest)
    last = len(layers) - 1
    stages = []
    for s, n in enumerate(layers):
        first, is_last = s == 0, s == last
        # A slice's checkpointed inputs, output and token ids are linear in its tokens: all of
        # them together cost what one chunk of the whole sequence does.
        # With a host tier every slice's checkpoints may wait on the host; the store never moves.
        inputs = 0.0 if cost.offloads else cost.activation_bytes(whole, n, n, first, is_last)
        split = (inputs + cost.kv_bytes(store, n) + cost.dkv_bytes(store, n)) if longest > 1 else float("inf")
        unsplit = cost.chunk_memory(whole, n, first, is_last).during_backward(n)
        states = cost.model_state_bytes(n, first, is_last)
        # The optimizer steps on the device, so its whole state is there once a step, at the least.
        stages.append(MemoryBound(s, states, min(split, unsplit), longest, split < unsplit,
                                  cost.all_model_state_bytes(n, first, is_last) - states))
    return max(stages, key=lambda b: b.bytes)
