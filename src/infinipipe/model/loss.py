"""Next-token cross-entropy in token blocks, normalised over the global batch, with its gradients
formed in forward.

The loss is the graph's last node and every chunk's backward is seeded with 1, so its gradients
are known as soon as the logits are: each block's logits are formed once, in forward, and turned
straight into the gradients of the final norm's input, the norm's weight and the LM head's weight.
Backward then only hands them over. A loss checkpointed per block (the way to avoid holding logits)
formed every block's logits twice: the head's work falls from 8 to 6 FLOPs per weight and token, on
the stage that already carries it on top of its layers. A chunk keeps its hidden states' gradient
(the size of the hidden states a checkpoint kept) until its backward; the weights' gradients add up
in one `HeadGradients` per stage until the next backward of any chunk takes them, so a stage holds
one head-sized gradient whatever number of chunks wait for their backward.

Dividing by the number of predicted tokens in the whole global batch makes the sum over chunks
independent of how the batch was cut.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..contract.cost import LOSS_BLOCK_TOKENS

IGNORE = -100


class HeadGradients:
    """Weight gradients of the final norm and the LM head that forwards formed and no backward has
    taken yet. The head's is kept in the head weight's dtype and summed in place, so the stage holds
    one buffer of the head's size rather than one per waiting chunk."""

    def __init__(self):
        self.norm: torch.Tensor | None = None
        self.head: torch.Tensor | None = None

    def add(self, norm_grad: torch.Tensor, logits_grad: torch.Tensor, normed: torch.Tensor) -> None:
        if self.norm is None:
            self.norm = norm_grad.clone()
            self.head = logits_grad.t() @ normed
        else:
            self.norm.add_(norm_grad)
            self.head.addmm_(logits_grad.t(), normed)

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        grads = self.norm, self.head
        self.norm = self.head = None
        return grads

    @property
    def empty(self) -> bool:
        return self.head is None


def _logits_loss(normed, weight, labels) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The block's summed cross-entropy, and a list its logits' gradient lands in during backward.
    The logits are not kept: log-softmax keeps its own output, so they are freed here, as a
    checkpointed loss's recomputed logits were."""
    logits = F.linear(normed, weight)
    grads: list[torch.Tensor] = []
    logits.register_hook(grads.append)
    wide = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return F.cross_entropy(wide, labels, ignore_index=IGNORE, reduction="sum"), grads


def _block(h, labels, norm, norm_weight, weight, scale, grad_h, sink) -> torch.Tensor:
    """One token block's loss; its gradients go to ``grad_h`` and ``sink``. A function of its
    own so that the block's tensors and graph are freed before the next block forms its own."""
    with torch.enable_grad():
        hb = h.detach().requires_grad_(True)
        normed = norm(hb)
        loss, logits_grad = _logits_loss(normed, weight, labels)
        g_h, g_norm = torch.autograd.grad(loss, [hb, norm_weight], scale)
    grad_h.copy_(g_h)
    sink.add(g_norm, logits_grad[0], normed.detach())
    return loss.detach()


class _LossWithGradients(torch.autograd.Function):
    """Forward: the loss, the hidden states' gradient (kept) and the weights' (added to ``sink``).
    Backward: those gradients times the seed."""

    @staticmethod
    def forward(ctx, h, norm_weight, head_weight, labels, norm, normaliser, block_tokens, sink):
        total = h.new_zeros((), dtype=torch.float64 if h.dtype == torch.float64 else torch.float32)
        scale = torch.full((), 1.0 / normaliser, dtype=total.dtype, device=h.device)
        grad_h = torch.empty_like(h)
        weight = head_weight.detach()
        for b in range(0, h.shape[0], block_tokens):
            # A block that predicts nothing adds zero; asking the labels first would wait for the device.
            total = total + _block(h[b:b + block_tokens], labels[b:b + block_tokens], norm, norm_weight,
                                   weight, scale, grad_h[b:b + block_tokens], sink)
        ctx.save_for_backward(grad_h)
        ctx.sink = sink
        return total / normaliser

    @staticmethod
    def backward(ctx, seed):
        (grad_h,) = ctx.saved_tensors
        norm_grad, head_grad = ctx.sink.take()
        # In place: the backward forms no tensor the size of the head or the chunk.
        scaled = [None if g is None else g.mul_(seed) for g in (grad_h, norm_grad, head_grad)]
        return (*scaled, None, None, None, None, None)


def blocked_cross_entropy(h: torch.Tensor, norm: nn.Module, head: nn.Module, labels: torch.Tensor,
                          normaliser: int, block_tokens: int = LOSS_BLOCK_TOKENS,
                          sink: HeadGradients | None = None) -> torch.Tensor:
    """Sum of token losses / ``normaliser``; ``labels`` is ``IGNORE`` where nothing is predicted.

    Gradients reach ``h``, ``norm.weight`` and ``head.weight`` when the result's backward runs. A
    stage running several chunks passes one ``sink``; the weights' gradients it holds go to
    whichever chunk's backward runs next, which is exact because every chunk's loss is seeded
    with the same 1.
    """
    if normaliser < 1:
        raise ValueError(f"loss normaliser must be >= 1 predicted token, got {normaliser}")
    if labels.shape[0] != h.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {h.shape[0]} tokens")
    return _LossWithGradients.apply(h, norm.weight, head.weight, labels, norm, normaliser, block_tokens,
                                    HeadGradients() if sink is None else sink)
