"""A plain single-device training loop: whole sequences, no chunks, no pipeline.

It is what EPP's loss curve must reproduce: the same model, data, optimizer, learning-rate
schedule and clipping as the pipelined job, with the textbook computation of each step.
"""
from __future__ import annotations

import torch

from ..config import Config
from ..data.dataset import TokenDataset, build_sampler
from ..runtime.batch import Batch
from ..runtime.full_sequence import reference_loss
from ..runtime.local import build_stages
from .optim import build_optimizer


def reference_losses(cfg: Config, dataset: TokenDataset, steps: int | None = None) -> list[float]:
    """Per-step losses of ``cfg``'s run on one device (``steps`` defaults to ``training.steps``)."""
    model_cfg = cfg.model_config()
    (model,) = build_stages(model_cfg, [model_cfg.layers], seed=cfg.training.seed, backend=cfg.model.attention)
    total = cfg.training.steps
    optimizer, scheduler = build_optimizer(cfg, model.parameters())
    sampler = build_sampler(cfg, dataset)
    losses = []
    for step in range(total if steps is None else steps):
        loss = reference_loss(model, Batch(sampler.batch(dataset, step).sequences))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.training.max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.max_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses
