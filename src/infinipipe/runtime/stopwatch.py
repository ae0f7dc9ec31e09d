"""Timestamps on the compute stream, read once the step is over.

On CUDA the host runs ahead of the device, so a host clock around enqueued work times the launch;
CUDA events recorded on the compute stream time the work, and reading them needs no device-wide
synchronize (which under NCCL would also wait for posted receives). On CPU the host clock is the
compute clock.
"""
from __future__ import annotations

import time

import torch


class Stopwatch:
    """``mark()`` records a point in time; `seconds` reads the span between two marks."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list = []
        self._read = False

    def mark(self) -> int:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())
        return len(self._marks) - 1

    def seconds(self, start: int, end: int) -> float:
        """Seconds from mark ``start`` to mark ``end``; the first call waits for the last mark."""
        if not self.cuda:
            return self._marks[end] - self._marks[start]
        if not self._read:
            self._marks[-1].synchronize()
            self._read = True
        return self._marks[start].elapsed_time(self._marks[end]) / 1e3
