"""`ChunkShape`: what the cost model sees of a chunk (segment lengths, cached prefix, kept K/V)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .ir import Chunk

# ``extra_segments``: sequences packed beside the first. Attention that runs one call per
# segment (SDPA on CPU) pays a fixed cost for each; one varlen kernel does not.
FEATURES = ("attn", "mask_area", "tokens", "kv", "chunk", "extra_segments")


@dataclass(frozen=True)
class ChunkShape:
    """What the cost model needs to know of a chunk.

    ``seg_lens[0]`` is the slice that attends to ``prefix`` cached tokens (``prefix`` is 0 for a
    batched chunk); ``kept`` is the length of the split sequence whose K/V store this chunk
    allocates (its first slice allocates the store for the whole sequence; 0 for other chunks).
    """

    seg_lens: tuple[int, ...]
    prefix: int = 0
    kept: int = 0
    features: dict[str, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "seg_lens", tuple(int(s) for s in self.seg_lens))
        if not self.seg_lens or min(self.seg_lens) < 1:
            raise ValueError(f"chunk shape needs non-empty segments, got {self.seg_lens}")
        if self.prefix < 0 or self.kept < 0 or (self.kept and (self.prefix or self.kept < self.seg_lens[0])):
            raise ValueError(f"invalid chunk shape prefix={self.prefix} kept={self.kept} segs={self.seg_lens}")
        object.__setattr__(self, "_hash", hash((self.seg_lens, self.prefix, self.kept)))
        # Planners cost each shape many times (every term, stage and candidate): derive once.
        object.__setattr__(self, "features", {"attn": self.attn_pairs, "mask_area": self.mask_area,
                                              "tokens": float(self.tokens), "kv": float(self.kv_len), "chunk": 1.0,
                                              "extra_segments": float(len(self.seg_lens) - 1)})

    def __hash__(self) -> int:
        return self._hash  # shapes key the planners' cost memos; hash the segment tuple once

    @property
    def tokens(self) -> int:
        return sum(self.seg_lens)

    @property
    def attn_pairs(self) -> float:
        """Causal (query, key) pairs, bottom-right aligned: slice s with prefix C sees C + i + 1 keys."""
        total = 0.0
        for i, s in enumerate(self.seg_lens):
            c = self.prefix if i == 0 else 0
            total += s * (s + 1) / 2 + c * s
        return total

    @property
    def mask_area(self) -> float:
        """Score rectangle of the prefixed slice (``s0 x (C + s0)``), 0 without a prefix: a kernel
        that needs an explicit mask for bottom-right causality (SDPA on CPU) builds and keeps one
        of this size per layer, and runs the masked entries too."""
        return float(self.seg_lens[0] * (self.prefix + self.seg_lens[0])) if self.prefix else 0.0

    @property
    def store_rows(self) -> int:
        """K/V rows of ``seg_lens[0]`` that live in its sequence's store (a slice of a split
        sequence reads its prefix and itself there), not in the layer's own activations."""
        return self.prefix + self.seg_lens[0] if self.prefix or self.kept else 0

    @property
    def kv_len(self) -> int:
        """Keys attended in total (cached prefix included): what memory-bound kernels read."""
        return self.tokens + self.prefix

    @classmethod
    def of(cls, chunk: Chunk, seq_lengths: Sequence[int]) -> "ChunkShape":
        part = chunk.partial_segment(seq_lengths)
        if part is None:
            return cls(chunk.seg_lens)
        rest = tuple(s.length for s in chunk.segments if s is not part)
        n = seq_lengths[part.seq_id]
        kept = n if part.start == 0 and part.end < n else 0
        return cls((part.length, *rest), prefix=part.start, kept=kept)
