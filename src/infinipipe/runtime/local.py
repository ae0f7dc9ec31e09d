"""Run a Plan in one process: the single-process chunked executor and an in-process pipeline.

With one stage this is the reference chunked executor; with several it plays every stage's
action list in dependency order, handing tensors from stage to stage in memory. The distributed
runtime must give the same loss and gradients.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..contract.cost import LOSS_BLOCK_TOKENS
from ..contract.ir import Plan, deferred_chunks, downstream_stage, upstream_stage, validate_plan
from ..contract.model_config import ModelConfig
from ..model.stage import StageModel, init_weights
from .batch import Batch
from .offload import HostTier, Offloader, copy_engine, late_copies_from_env, reload_points
from .sequence_parallel import SequenceParallel
from .stage_compute import StageCompute


def build_stages(cfg: ModelConfig, layers_per_stage: Sequence[int], seed: int = 0,
                 dtype: torch.dtype = torch.float32, backend: str = "auto") -> list[StageModel]:
    """One `StageModel` per stage; weights equal those of the whole model built with the same seed."""
    if sum(layers_per_stage) != cfg.layers:
        raise ValueError(f"layers_per_stage {tuple(layers_per_stage)} sums to {sum(layers_per_stage)}, "
                         f"the model has {cfg.layers} layers")
    stages, lo = [], 0
    for s, n in enumerate(layers_per_stage):
        m = StageModel(cfg, range(lo, lo + n), first=s == 0, last=s == len(layers_per_stage) - 1,
                       backend=backend).to(dtype)
        init_weights(m, seed)
        stages.append(m)
        lo += n
    return stages


def run_plan_local(plan: Plan, stages: Sequence[StageModel], batch: Batch,
                   normaliser: int | None = None, loss_block_tokens: int = LOSS_BLOCK_TOKENS,
                   sp: SequenceParallel | None = None, host_tiers: Sequence[HostTier] | None = None,
                   late_copies: bool | None = None) -> float:
    """Execute ``plan`` over ``stages`` in this process; returns the loss, leaves gradients in ``.grad``.

    With ``sp`` every rank of the SP group plays the plan on its share of each chunk's tokens; the
    loss and gradients returned are this rank's part (`SequenceParallel` sums them). Offloaded
    layers wait in ``host_tiers`` (one per stage; by default new ones, which have no room until a
    step has sized them); ``late_copies`` (default: ``INFINIPIPE_LATE_COPIES``) completes copies
    late on CPU, as `offload.LateCopies` describes.
    """
    order = validate_plan(plan)
    if len(stages) != plan.num_stages:
        raise ValueError(f"plan has {plan.num_stages} stages, got {len(stages)} stage models")
    if tuple(batch.lengths) != plan.seq_lengths:
        raise ValueError("the batch's sequence lengths differ from the plan's")
    devices = [next(m.parameters()).device for m in stages]
    tiers = list(host_tiers) if host_tiers is not None else [HostTier(d) for d in devices]
    late = late_copies_from_env() if late_copies is None else late_copies
    engines = [copy_engine(d, late) for d in devices]
    for tier in tiers:
        tier.begin_step()
    computes = [StageCompute(m, batch, normaliser, loss_block_tokens, sp=sp, offloader=Offloader(e, t, d))
                for m, e, t, d in zip(stages, engines, tiers, devices)]
    reloads = [reload_points(actions) for actions in plan.stage_actions]
    deferred = [deferred_chunks(actions) for actions in plan.stage_actions]
    position = {(s, a.kind, a.chunk_id): i for s, actions in enumerate(plan.stage_actions) for i, a in enumerate(actions)}
    outputs: dict[tuple[str, int, int], torch.Tensor | None] = {}
    n = plan.num_stages
    loss = 0.0
    try:
        for s, a in order:
            for cid in reloads[s].get(position[s, a.kind, a.chunk_id], ()):
                computes[s].reload(plan.chunks[cid])
            chunk = plan.chunks[a.chunk_id]
            src = upstream_stage(a.kind, s, n)
            x = outputs.pop((a.kind, src, a.chunk_id)) if src is not None else None
            if a.kind == "F":
                out = computes[s].forward(chunk, x, a.recompute_layers, a.elementwise_layers, a.offload_layers)
            elif a.kind == "B":
                out = computes[s].backward(chunk, x, a.chunk_id in deferred[s])
            else:
                out = computes[s].weights(chunk)
            if downstream_stage(a.kind, s, n) is not None:
                outputs[(a.kind, s, a.chunk_id)] = out
            elif a.kind == "F":
                loss += float(out)
        for compute in computes:
            compute.finish()
    finally:
        for engine in engines:
            engine.close()
    return loss
