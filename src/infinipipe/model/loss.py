"""Next-token cross-entropy in token blocks, normalised over the global batch.

Each block's logits are recomputed in backward (non-reentrant checkpoint), so a long chunk never
holds logits for all its tokens at once. Dividing by the number of predicted tokens in the whole
global batch makes the sum over chunks independent of how the batch was cut.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..contract.cost import LOSS_BLOCK_TOKENS

IGNORE = -100


def _block_loss(h: torch.Tensor, labels: torch.Tensor, norm: nn.Module, head: nn.Module) -> torch.Tensor:
    logits = head(norm(h))
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


def blocked_cross_entropy(h: torch.Tensor, norm: nn.Module, head: nn.Module, labels: torch.Tensor,
                          normaliser: int, block_tokens: int = LOSS_BLOCK_TOKENS) -> torch.Tensor:
    """Sum of token losses / ``normaliser``; ``labels`` is ``IGNORE`` where nothing is predicted."""
    if normaliser < 1:
        raise ValueError(f"loss normaliser must be >= 1 predicted token, got {normaliser}")
    if labels.shape[0] != h.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {h.shape[0]} tokens")
    total = h.new_zeros((), dtype=torch.float64 if h.dtype == torch.float64 else torch.float32)
    for b in range(0, h.shape[0], block_tokens):
        # A block that predicts nothing adds zero; asking the labels first would wait for the device.
        hb, lb = h[b:b + block_tokens], labels[b:b + block_tokens]
        total = total + checkpoint(_block_loss, hb, lb, norm, head, use_reentrant=False)
    return total / normaliser
