"""What a resume onto another parallel layout than the checkpoint writer's says.

Checkpoint state is keyed by parameter name, so DCP reshards it for any layout; a person should
still hear that the job's layout changed, since a changed degree changes the step's numerics in
the last bits and a typo in a degree would otherwise go unnoticed.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from ..config import Config
from ..config.schema import ParallelismConfig
from ..runtime.parallel_dims import ParallelDims
from .checkpoint import checkpoint_config, saved_ranks


def _degrees(dims: ParallelDims) -> str:
    return f"pp={dims.pp}, dp_replicate={dims.dp_replicate}, dp_shard={dims.dp_shard}, sp={dims.sp}"


def layout_notice(checkpoint: Path, cfg: Config, world: int) -> str | None:
    """The notice for resuming ``checkpoint`` with ``cfg``'s layout on ``world`` ranks, or None
    when the layout is the writer's."""
    ranks = saved_ranks(checkpoint)
    now = ParallelDims.from_config(cfg.parallelism, world)
    text = checkpoint_config(checkpoint)
    then = None
    if text is not None:
        try:
            then = ParallelDims.from_config(ParallelismConfig(**tomllib.loads(text).get("parallelism", {})), ranks)
        except (ValueError, TypeError):
            then = None
    if (then == now) if then is not None else ranks == world:
        return None
    written = f"{ranks} rank(s)" + (f" ({_degrees(then)})" if then is not None else "")
    fresh = (f"; ranks {ranks}-{world - 1} had no saved random state and keep their own" if world > ranks else "")
    return (f"checkpoint {checkpoint.name} was written by {written}; this job has {world} rank(s) ({_degrees(now)}): "
            f"weights and optimizer state are resharded by parameter name{fresh}")
