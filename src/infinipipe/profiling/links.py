"""Measuring the links between local ranks (`infinipipe profile --links`).

A few local processes time all-to-all (Ulysses SP) and all-gather (FSDP) at a few message sizes,
and a line ``latency + bytes / bandwidth`` is fitted to each and to both together. Bytes are
counted as `StageLayout.collective_s` counts them (the ``(g - 1) / g`` of a rank's share that
leaves it), so the fitted link drops straight into the cost model as its ``intra_node`` link.
Every process runs on this host: the figures say nothing about links between nodes.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..contract.layout import LINKS_FORMAT_VERSION, LinkModel
from ..runtime.launch import launch_local

COLLECTIVES = ("all_to_all", "all_gather")
LINK_SIZES = (2**16, 2**20, 2**23)  # bytes each rank holds of the whole: 64 KiB, 1 MiB, 8 MiB
SINGLE_HOST_NOTE = ("measured between processes of one host: these are intra-node links; inter-node links were not "
                    "measured and keep their configured values")


def _time_collectives(sizes: Sequence[int], warmup: int, reps: int) -> list[tuple[str, int, float]]:
    """One rank's part: every (collective, size) timed ``reps`` times. A run's time is its slowest
    rank's (a collective ends for the group when its last rank ends), and the fastest run is kept:
    on a shared machine other processes only ever add time."""
    world = dist.get_world_size()
    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", dist.get_rank()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # torch 2.13 renamed all_gather_into_tensor (now deprecated); the project supports torch >= 2.10
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    rows = []
    for name in COLLECTIVES:
        for nbytes in sizes:
            elems = max(world, nbytes // 4 // world * world)
            whole = torch.ones(elems, device=device)
            out = torch.empty_like(whole)
            share = whole[: elems // world]
            times = []
            for i in range(warmup + reps):
                dist.barrier()
                start = time.perf_counter()
                if name == "all_to_all":
                    dist.all_to_all_single(out, whole)
                else:
                    gather(out, share)
                if cuda:
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
            slowest = torch.tensor(times, dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            rows.append((name, elems * 4, min(slowest.tolist())))
    return rows


def fit_link(samples: Sequence[tuple[float, float]]) -> LinkModel:
    """Least-squares ``seconds = latency + bytes / bandwidth`` over (bytes moved, seconds) pairs,
    latency held at 0 where the free fit would make it negative."""
    x, t = (np.array(v, dtype=float) for v in zip(*samples))
    if len(set(x)) < 2:
        raise ValueError("fitting a link needs at least two message sizes")
    slope, latency = np.polyfit(x, t, 1)
    if latency < 0:
        slope, latency = float(x @ t / (x @ x)), 0.0
    if slope <= 0:
        raise ValueError("collective times did not grow with message size (noise swamps the transfer); "
                         "measure larger sizes with --link-bytes")
    return LinkModel(latency_s=float(latency), bandwidth_Bps=float(1 / slope))


def measure_links(procs: int, sizes: Sequence[int] = LINK_SIZES, warmup: int = 2, reps: int = 5) -> dict[str, Any]:
    """Time the collectives over ``procs`` local processes (NCCL when that many GPUs are here,
    else gloo on CPU) and fit the links: the contents of a links file (`read_links`)."""
    if procs < 2:
        raise ValueError(f"measuring links needs at least 2 processes, got {procs}")
    if not sizes or min(sizes) < 4:
        raise ValueError(f"message sizes must be at least 4 bytes, got {list(sizes)}")
    nccl = torch.cuda.is_available() and torch.cuda.device_count() >= procs
    backend = "nccl" if nccl else "gloo"
    rows = launch_local(_time_collectives, procs, args=(tuple(sizes), warmup, reps), backend=backend,
                        timeout_s=300.0)[0]
    moved = (procs - 1) / procs
    collectives = {}
    for name in COLLECTIVES:
        mine = [(nbytes, seconds) for n, nbytes, seconds in rows if n == name]
        link = fit_link([(nbytes * moved, seconds) for nbytes, seconds in mine])
        collectives[name] = {**link.to_json(), "samples": [{"bytes": b, "seconds": s} for b, s in mine]}
    both = fit_link([(nbytes * moved, seconds) for _, nbytes, seconds in rows])
    device = torch.cuda.get_device_name(0) if nccl else "cpu"
    note = SINGLE_HOST_NOTE if nccl else f"{SINGLE_HOST_NOTE}; gloo between CPU processes times this host's memory and " \
        "loopback, not GPU links"
    return {"version": LINKS_FORMAT_VERSION, "backend": backend, "device": device, "processes": procs, "hosts": 1,
            "note": note, "intra_node": both.to_json(), "collectives": collectives}
