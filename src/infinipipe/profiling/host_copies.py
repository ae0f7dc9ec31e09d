"""Measuring a GPU's pinned copies to its host: each direction alone and both at once.

What offloading relies on: one slab of pinned host memory (allocated once, as the runtime does),
one copy stream per direction, times from CUDA events on those streams read after a device-wide
synchronise (nothing else runs here). The concurrent figure is each direction's bandwidth while
the other copies the same size at the same time; latency is a small copy's time.
"""
from __future__ import annotations

import os
import statistics

from ..contract.host import HostLink

_SMALL = 4096


def _host_memory_per_device(devices: int) -> float:
    """Physical memory of this host shared by its GPUs (what a plan may count on, before a margin)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(devices, 1)


def measure_host_link(nbytes: int = 1 << 30, reps: int = 5) -> HostLink:
    """Pinned copy bandwidth and latency of the current CUDA device, alone and concurrent."""
    import torch

    if not torch.cuda.is_available():
        raise ValueError("measuring the host link needs a CUDA device")
    device = torch.device("cuda", torch.cuda.current_device())
    host = torch.empty(2 * nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(2 * nbytes, dtype=torch.uint8, device=device)
    streams = {"d2h": torch.cuda.Stream(device), "h2d": torch.cuda.Stream(device)}

    def copy(direction: str, size: int, part: int) -> None:
        src, dst = (dev, host) if direction == "d2h" else (host, dev)
        dst[part * nbytes: part * nbytes + size].copy_(src[part * nbytes: part * nbytes + size], non_blocking=True)

    def timed(directions: tuple[str, ...], size: int) -> dict[str, float]:
        times: dict[str, list[float]] = {d: [] for d in directions}
        for _ in range(reps + 1):  # the first round warms the copy engines up
            marks = {}
            for part, d in enumerate(directions):
                with torch.cuda.stream(streams[d]):
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record()
                    copy(d, size, part)
                    end.record()
                marks[d] = (begin, end)
            torch.cuda.synchronize(device)
            for d, (begin, end) in marks.items():
                times[d].append(begin.elapsed_time(end) / 1e3)
        return {d: statistics.median(t[1:]) for d, t in times.items()}

    alone = {d: nbytes / timed((d,), nbytes)[d] for d in ("d2h", "h2d")}
    both = timed(("d2h", "h2d"), nbytes)
    latency = statistics.median(timed((d,), _SMALL)[d] for d in ("d2h", "h2d"))
    return HostLink(h2d_Bps=alone["h2d"], d2h_Bps=alone["d2h"],
                    h2d_concurrent_Bps=min(nbytes / both["h2d"], alone["h2d"]),
                    d2h_concurrent_Bps=min(nbytes / both["d2h"], alone["d2h"]),
                    latency_s=latency, host_memory_bytes=_host_memory_per_device(torch.cuda.device_count()),
                    source=f"measured on {torch.cuda.get_device_name(device)}: pinned copies of {nbytes} bytes, "
                           f"median of {reps}, each direction alone and both at once")
