"""The host tier of a device: its pinned-copy links to the host and the host memory behind it.

Offloading is a promise about bandwidth and timing, so a profile carries what the copies cost:
pinned host-to-device and device-to-host bandwidth each alone, what each keeps while the other
direction runs (PCIe is full duplex, but the host's memory and the copy engines are shared), a
latency per copy, and the host memory a device may use.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class HostLink:
    """Pinned copies between one device and its host (bytes per second, seconds, bytes)."""

    h2d_Bps: float
    d2h_Bps: float
    h2d_concurrent_Bps: float
    d2h_concurrent_Bps: float
    latency_s: float
    host_memory_bytes: float
    source: str = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "source" and not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"host_link.{f.name} must be a number >= 0, got {value!r}")
        for direction in ("h2d", "d2h"):
            alone, both = getattr(self, f"{direction}_Bps"), getattr(self, f"{direction}_concurrent_Bps")
            if not 0 < both <= alone:
                raise ValueError(f"host_link.{direction}_concurrent_Bps ({both}) must be > 0 and at most "
                                 f"host_link.{direction}_Bps ({alone})")

    def rate(self, direction: str, other_busy: bool) -> float:
        """Bytes per second of ``"h2d"`` or ``"d2h"``, while the other direction runs or not."""
        return getattr(self, f"{direction}_concurrent_Bps" if other_busy else f"{direction}_Bps")

    def scaled(self, factor: float) -> "HostLink":
        """The same link at ``factor`` times its bandwidth (what a plan must survive)."""
        return HostLink(self.h2d_Bps * factor, self.d2h_Bps * factor, self.h2d_concurrent_Bps * factor,
                        self.d2h_concurrent_Bps * factor, self.latency_s, self.host_memory_bytes,
                        f"{self.source} (bandwidth x {factor:g})")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "HostLink":
        names = {f.name for f in fields(cls)}
        if not isinstance(obj, Mapping) or not names - {"source"} <= set(obj) <= names:
            raise ValueError(f"host_link must be an object with {sorted(names - {'source'})} (and source), got {obj!r}")
        return cls(**{k: (str(v) if k == "source" else float(v)) for k, v in obj.items()})


PUBLISHED_H100_HOST = HostLink(
    h2d_Bps=35e9, d2h_Bps=53e9, h2d_concurrent_Bps=11e9, d2h_concurrent_Bps=16.7e9, latency_s=10e-6,
    host_memory_bytes=256 * 2**30,
    source="published figures, not measured here: pinned copies on an H100 host measured with nvbandwidth "
           "(35 GB/s host-to-device, 53 GB/s device-to-host per GPU); while the other direction runs each keeps "
           "the 31% that host-to-device kept on one A100 host (11 of 35 GB/s); 2 TB of host memory for 8 GPUs")
"""What the committed H100 and H200 profiles take until a GPU measures its own (`infinipipe profile`)."""
