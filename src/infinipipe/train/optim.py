"""The optimizer and learning-rate schedule of a run, built one way for the pipelined job and the
single-device reference, so the two can only differ in how gradients are computed."""
from __future__ import annotations

from collections.abc import Iterable

import torch

from ..config import Config


def build_optimizer(cfg: Config, params: Iterable[torch.nn.Parameter]
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with ``cfg.optimizer`` and a per-step ``LambdaLR`` of ``cfg.lr_scheduler`` over
    ``training.steps`` (a pure function of the step, so a resumed run gets the same rates)."""
    o, total = cfg.optimizer, cfg.training.steps
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cfg.lr_scheduler.factor(s, total))
    return optimizer, scheduler
