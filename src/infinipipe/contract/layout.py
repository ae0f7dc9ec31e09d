"""What a stage's ranks cost to talk to each other: links, and the layout of one stage.

A pipeline stage may run on a group of ranks: Ulysses sequence parallelism of degree ``sp``
(a chunk's tokens spread over the ranks, four all-to-alls per layer around attention, the paper's
Eq. 3: bytes / bandwidth + latency) and FSDP sharding of its parameters over ``fsdp`` ranks.
Collectives inside a node use the ``intra_node`` link, those whose group spans nodes are limited by
the ``inter_node`` link; both are configurable.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinkModel:
    """A link's per-GPU bandwidth and latency (default: one 200 Gb/s InfiniBand port per GPU)."""

    latency_s: float = 10e-6
    bandwidth_Bps: float = 25e9

    def __post_init__(self) -> None:
        if self.latency_s < 0:
            raise ValueError(f"link latency_s must be >= 0, got {self.latency_s}")
        if self.bandwidth_Bps <= 0:
            raise ValueError(f"link bandwidth_Bps must be > 0, got {self.bandwidth_Bps}")

    def transfer_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps


NVLINK = LinkModel(latency_s=10e-6, bandwidth_Bps=150e9)  # NCCL all-to-all bus bandwidth on an 8-GPU NVLink node
INFINIBAND = LinkModel()


@dataclass(frozen=True)
class StageLayout:
    """The ranks of one pipeline stage: ``sp``-way Ulysses SP, parameters sharded over ``fsdp``.

    ``fsdp`` counts every rank a stage's parameters are sharded over (``dp_shard x sp``, as
    torchtitan shards over ``dp_shard x cp``). ``reshard_per_chunk`` picks the FSDP timing:
    ``False`` gathers the stage's parameters once per step and reduce-scatters gradients once at
    its end (gathered weights and accumulated gradients are whole on every rank for the step,
    only the optimizer state and the fp32 master copy are sharded); ``True`` is ZeRO-3 as
    DeepSpeed runs it: every chunk gathers each layer in forward and backward and reduce-scatters
    its gradients, overlapped with compute by prefetching, and only a working set of layers is
    ever whole. Groups are consecutive ranks, ``gpus_per_node`` to a node.
    """

    sp: int = 1
    fsdp: int = 1
    reshard_per_chunk: bool = False
    gpus_per_node: int = 8
    intra_node: LinkModel = NVLINK
    inter_node: LinkModel = INFINIBAND

    def __post_init__(self) -> None:
        for name in ("sp", "fsdp", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"layout {name} must be >= 1, got {getattr(self, name)}")

    def collective_s(self, group: int, nbytes: float) -> float:
        """One all-to-all, all-gather or reduce-scatter over ``group`` consecutive ranks where each
        rank holds ``nbytes`` of the whole and exchanges ``(group - 1) / group`` of it; the share
        bound for other nodes travels over the inter-node link, in parallel with the rest."""
        if group == 1:
            return 0.0
        local = min(group, self.gpus_per_node)
        intra = nbytes * (local - 1) / group / self.intra_node.bandwidth_Bps
        if local == group:
            return self.intra_node.latency_s + intra
        inter = nbytes * (group - local) / group / self.inter_node.bandwidth_Bps
        return self.inter_node.latency_s + max(intra, inter)

    def all_to_all_s(self, nbytes: float, count: int) -> float:
        """``count`` all-to-alls over the SP group moving ``nbytes`` per rank in all."""
        if self.sp == 1:
            return 0.0
        return count * self.collective_s(self.sp, nbytes / count)

    def fsdp_s(self, nbytes: float) -> float:
        """All-gather (or reduce-scatter) of ``nbytes`` of whole parameters over the FSDP group."""
        return self.collective_s(self.fsdp, nbytes)
