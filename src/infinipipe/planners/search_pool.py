"""Processes that plan a search's candidates side by side.

Planning one candidate (chunking, grouping DP, checkpointing ILPs, simulation) is independent
of every other, so a search hands the candidates it will look at next to a pool and reads the
answers in its own order: its decisions, and so its plan, are those of the one-process search
whatever the pool's size. A pool lives as long as the process that made it (training plans
every step with the same one), and its workers keep each search's chunkings and ILP answers.
"""
from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

AUTO = -1  # pool_size: as many processes as the cores the training ranks leave (`auto_pool_size`)
MAX_AUTO_POOL = 8  # a search rarely has more candidates of one kind to screen at once
MIN_AUTO_POOL = 3


def usable_cores() -> int:
    """Cores this process may run on (its affinity where the OS says, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def auto_pool_size(ranks_on_node: int) -> int:
    """The cores left by ``ranks_on_node`` training ranks (one each) and the planning process
    itself, which weighs the answers, capped at MAX_AUTO_POOL; fewer than MIN_AUTO_POOL spare
    cores make no pool (0): starting and feeding workers would cost what they save."""
    spare = min(MAX_AUTO_POOL, usable_cores() - ranks_on_node - 1)
    return spare if spare >= MIN_AUTO_POOL else 0


def resolve_pool_size(pool_size: int, ranks_on_node: int = 0) -> int:
    """``pool_size`` with AUTO resolved."""
    return auto_pool_size(ranks_on_node) if pool_size == AUTO else pool_size


class SearchPool:
    """``size`` worker processes (started with ``spawn``, safe next to threads and CUDA)."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"a search pool needs at least one process, got {size}")
        self.size = size
        self._executor = ProcessPoolExecutor(size, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self._executor.submit(fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


_POOLS: dict[int, SearchPool] = {}


def shared_pool(size: int) -> SearchPool | None:
    """This process's pool of ``size`` workers (None for size 0: plan in-process), started on
    first use and shut down at exit."""
    if size <= 0:
        return None
    if size not in _POOLS:
        if not _POOLS:
            atexit.register(close_pools)
            # A process started by multiprocessing (the trainer's planning process) joins its
            # children before its atexit handlers run, and closes its queues first (priority
            # 10): the pool must be shut down before either, or its idle workers hold it forever.
            multiprocessing.util.Finalize(None, close_pools, exitpriority=100)
        _POOLS[size] = SearchPool(size)
    return _POOLS[size]


def close_pools() -> None:
    while _POOLS:
        _POOLS.popitem()[1].close()
