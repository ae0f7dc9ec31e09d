"""Plan iteration i+1 in a background process while iteration i trains (paper §7).

Planning is CPU work in Python; a separate process keeps it off the training process's
interpreter lock. The queue of planned-ahead iterations is bounded, so a slow trainer never
lets the planner run far ahead and hold many plans in memory.
"""
from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from ..contract.ir import Plan

R = TypeVar("R")


class PlanningProcessDied(RuntimeError):
    """The background planning process was killed (a signal, the kernel's out-of-memory killer)."""


class PlanPrefetcher(Iterator[Plan]):
    """Yields ``plan_fn(request)`` for each request in order, planning up to ``depth`` ahead.

    ``plan_fn`` must be a picklable module-level function (the worker is started with ``spawn``,
    safe next to CUDA and threads). A planning error is re-raised in the consumer with its own
    type and message, plus a note naming the iteration; a planning process that died is
    `PlanningProcessDied`, which says so. ``on_result`` sees each result before the next
    request is drawn, so a request may depend on the plans handed out so far (a warm start);
    ``ready`` says whether the last result was done before it was asked for (planning hidden).
    """

    def __init__(self, plan_fn: Callable[[R], Plan], requests: Iterable[R], depth: int = 1,
                 start_method: str = "spawn", on_result: Callable[[Plan], None] | None = None):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._fn = plan_fn
        self._requests = iter(requests)
        self._depth = depth
        self._pending: deque[tuple[int, Future]] = deque()
        self._submitted = 0
        self._on_result = on_result
        self.ready = False
        self._pool: ProcessPoolExecutor | None = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context(start_method))
        self._fill()

    def _fill(self) -> None:
        while self._pool is not None and len(self._pending) < self._depth:
            try:
                request = next(self._requests)
            except StopIteration:
                return
            self._pending.append((self._submitted, self._pool.submit(self._fn, request)))
            self._submitted += 1

    def __next__(self) -> Plan:
        if not self._pending:
            self.close()
            raise StopIteration
        index, future = self._pending.popleft()
        self.ready = future.done()
        try:
            plan = future.result()
        except BrokenProcessPool as exc:
            self.close()
            raise PlanningProcessDied(f"the planning process ended abruptly while planning iteration {index} "
                                      "(killed, or out of memory); epp.prefetch = false plans in the training "
                                      "process instead") from exc
        except BaseException as exc:
            self.close()
            exc.add_note(f"while planning iteration {index} in the background")
            raise
        if self._on_result is not None:
            self._on_result(plan)
        self._fill()
        return plan

    @property
    def in_flight(self) -> int:
        """Iterations submitted and not yet handed out (never more than ``depth``)."""
        return len(self._pending)

    def close(self) -> None:
        if self._pool is not None:
            for _, f in self._pending:
                f.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "PlanPrefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
