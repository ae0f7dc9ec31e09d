"""What a stage's ranks cost to talk to each other: links, and the layout of one stage.

A pipeline stage may run on a group of ranks: Ulysses sequence parallelism of degree ``sp``
(a chunk's tokens spread over the ranks, all-to-alls around attention priced by the paper's
Eq. 3: bytes / bandwidth + latency) and FSDP sharding of its parameters over ``fsdp`` ranks.
Collectives inside a node use the ``intra_node`` link, those whose group spans nodes are limited by
the ``inter_node`` link; both are configurable.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LINKS_FORMAT_VERSION = 1


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

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], where: str = "link") -> "LinkModel":
        if not isinstance(obj, Mapping) or set(obj) != {"latency_s", "bandwidth_Bps"}:
            raise ValueError(f"{where} must be an object with latency_s and bandwidth_Bps, got {obj!r}")
        return cls(float(obj["latency_s"]), float(obj["bandwidth_Bps"]))


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
    ever whole. Groups are consecutive ranks, ``gpus_per_node`` to a node; a stage holds
    ``dp_replicate`` such groups (replicas), and the pipeline dimension is outermost, which
    places the stages and so decides which of their point-to-point hops cross nodes.
    """

    sp: int = 1
    fsdp: int = 1
    reshard_per_chunk: bool = False
    gpus_per_node: int = 8
    dp_replicate: int = 1
    intra_node: LinkModel = NVLINK
    inter_node: LinkModel = INFINIBAND

    def __post_init__(self) -> None:
        for name in ("sp", "fsdp", "gpus_per_node", "dp_replicate"):
            if getattr(self, name) < 1:
                raise ValueError(f"layout {name} must be >= 1, got {getattr(self, name)}")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "intra_node": self.intra_node.to_json(), "inter_node": self.inter_node.to_json()}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "StageLayout":
        """The layout a plan records in its metadata (``layout``)."""
        known = {"sp", "fsdp", "reshard_per_chunk", "gpus_per_node", "dp_replicate", "intra_node", "inter_node"}
        if not isinstance(obj, Mapping) or set(obj) - known:
            raise ValueError(f"a stage layout has the keys {sorted(known)}, got {obj!r}")
        links = {k: LinkModel.from_json(obj[k], f"layout {k}") for k in ("intra_node", "inter_node") if k in obj}
        return cls(**{k: v for k, v in obj.items() if k not in links}, **links)

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

    def hop_links(self, num_stages: int) -> tuple[LinkModel, ...]:
        """The link of each hop between stages ``s`` and ``s + 1``: stage ``s`` holds ranks
        ``[s g, (s + 1) g)`` with ``g = dp_replicate x max(sp, fsdp)``, and rank ``s g + j`` sends to
        ``(s + 1) g + j``; a hop where any such pair sits on two nodes runs at the inter-node link."""
        g, node = self.dp_replicate * max(self.sp, self.fsdp), self.gpus_per_node
        return tuple(self.inter_node if g >= node or (s * g) // node != ((s + 2) * g - 1) // node else self.intra_node
                     for s in range(num_stages - 1))


def read_links(path: str | Path) -> dict[str, LinkModel]:
    """The links a links file (``infinipipe profile --links``) measured, by name (``intra_node``,
    and ``inter_node`` only where more than one host was measured)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"links file {path}: not readable JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("version") != LINKS_FORMAT_VERSION:
        raise ValueError(f"links file {path}: expected version {LINKS_FORMAT_VERSION} of `infinipipe profile --links`")
    links = {k: LinkModel.from_json(obj[k], f"links file {path}: {k}") for k in ("intra_node", "inter_node") if k in obj}
    if not links:
        raise ValueError(f"links file {path}: measures neither intra_node nor inter_node")
    return links

