"""Mixed precision as GPU training runs it: a low-precision model, full-precision master weights.

The stage computes in the model's dtype (bf16 weights, activations, checkpoints and P2P
payloads); the master copy holds the weights the optimizer steps and, in its ``.grad``, the
gradients. Each low-precision gradient is added into the master gradient as soon as autograd has
accumulated it and is then dropped, so gradients accumulate over a step's chunks and are
all-reduced in the master dtype (Megatron's distributed optimizer, FSDP2's
``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``).
"""
from __future__ import annotations

import torch
from torch import nn


class MasterWeights:
    """``master``: the weights of ``model`` in full precision; call `refresh` after each step."""

    def __init__(self, model: nn.Module, master: nn.Module):
        self.model, self.master = model, master
        self.refresh()
        for p, m in zip(model.parameters(), self.master.parameters()):
            p.register_post_accumulate_grad_hook(lambda p, m=m: self._accumulate(p, m))

    @staticmethod
    def _accumulate(p: torch.Tensor, m: torch.Tensor) -> None:
        if p.grad is None:  # a backward that left this weight's gradient to a W action
            return
        if m.grad is None:
            m.grad = p.grad.to(m.dtype)
        else:
            m.grad.add_(p.grad)
        p.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the master weights, rounded, into the model that computes."""
        for p, m in zip(self.model.parameters(), self.master.parameters()):
            p.copy_(m)
