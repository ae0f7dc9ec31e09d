"""The plain single-process, full-sequence run every plan must reproduce (DESIGN invariant 3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.layers import ChunkMeta
from ..model.stage import StageModel
from .batch import Batch


def reference_loss(model: StageModel, batch: Batch) -> torch.Tensor:
    """Each whole sequence through every layer, full logits, one global token-mean loss."""
    if not (model.first and model.last):
        raise ValueError("the reference run needs the whole model on one stage")
    total = 0.0
    for seq in batch.sequences:
        meta = ChunkMeta.build([seq.numel()], [0], seq.device)
        h = model.embed_tokens(seq)
        for layer in model.ordered_layers():
            h = layer(h, meta)
        logits = model.head(model.norm(h)).float() if h.dtype != torch.float64 else model.head(model.norm(h))
        total = total + F.cross_entropy(logits[:-1], seq[1:], reduction="sum")
    return total / batch.predicted_tokens
