"""A global batch of token sequences, and the per-chunk views the stages need."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..contract.ir import Chunk
from ..model.loss import IGNORE


@dataclass(frozen=True)
class Batch:
    """Token ids of each sequence (1-D long tensors); ``seq_id`` is the index in ``sequences``."""

    sequences: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "sequences", tuple(self.sequences))
        for i, s in enumerate(self.sequences):
            if s.dim() != 1 or s.numel() == 0:
                raise ValueError(f"sequence {i} must be a non-empty 1-D tensor of token ids")
            if s.dtype != torch.long:
                raise ValueError(f"sequence {i} has dtype {s.dtype}; token ids must be torch.long")

    @classmethod
    def of(cls, sequences: Sequence[Sequence[int]] | Sequence[torch.Tensor]) -> "Batch":
        return cls(tuple(torch.as_tensor(s, dtype=torch.long) for s in sequences))

    def check_token_ids(self, vocab_size: int) -> None:
        """Every id in ``[0, vocab_size)``: checked on the host once per step, where the batch reaches
        the embedding stage, rather than on the device per chunk."""
        for i, s in enumerate(self.sequences):
            lo, hi = torch.aminmax(s)
            if lo < 0 or hi >= vocab_size:
                bad = int(lo) if lo < 0 else int(hi)
                raise ValueError(f"sequence {i}: token id {bad} outside the vocabulary 0..{vocab_size - 1}")

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(int(s.numel()) for s in self.sequences)

    @property
    def predicted_tokens(self) -> int:
        """Every token but each sequence's last predicts the next one."""
        return sum(n - 1 for n in self.lengths)

    def chunk_tokens(self, chunk: Chunk) -> torch.Tensor:
        return torch.cat([self.sequences[s.seq_id][s.start:s.end] for s in chunk.segments])

    def chunk_labels(self, chunk: Chunk) -> torch.Tensor:
        """Next-token targets; a slice's last token predicts the next slice's first token."""
        parts = []
        for s in chunk.segments:
            seq = self.sequences[s.seq_id]
            lab = seq[s.start + 1:s.end + 1]
            if lab.numel() < s.length:
                lab = torch.cat([lab, torch.full((s.length - lab.numel(),), IGNORE, dtype=torch.long)])
            parts.append(lab)
        return torch.cat(parts)
