"""Stopping a job on request, and never outliving the process that started it.

A rank does not die on SIGTERM or SIGINT: `StopRequest` records the signal, the training loop
ends at its next step boundary (after a checkpoint), and a timer ends the process regardless
``STOP_GRACE_S`` later, so a stop takes bounded time even when a step cannot finish.
`exit_with_parent` makes a child notice the death of its parent (on Linux ``PR_SET_PDEATHSIG``,
elsewhere a thread watching the parent pid), so no rank or helper trains on alone.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Any, Self

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_GRACE_S = 25.0
_PR_SET_PDEATHSIG = 1


class StopSignals:
    """While entered, SIGTERM and SIGINT call ``_on_signal``; leaving restores the handlers before."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, _frame: Any) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        # a process started with them blocked (a local job's rank) takes any that waited now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StopRequest(StopSignals):
    """While entered, SIGTERM/SIGINT set ``signum`` instead of killing; later signals are ignored."""

    def __init__(self, grace_s: float = STOP_GRACE_S):
        super().__init__()
        self.grace_s = grace_s
        self.signum = 0

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.signum:
            return
        self.signum = signum
        timer = threading.Timer(self.grace_s, os._exit, (128 + signum,))
        timer.daemon = True
        timer.start()


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def exit_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """Deliver ``sig`` to this process when ``parent_pid`` (its parent) dies.

    On Linux the kernel delivers it when the parent *thread* that started this process exits,
    so start children from a thread that lives as long as the job (the main thread).
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:  # the parent died before the request was in place
            os.kill(os.getpid(), sig)
        return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


_helper_of: set[int] = set()


def serve_parent(parent_pid: int) -> None:
    """Make this process a helper of ``parent_pid``: deaf to stop signals, killed with its parent.

    A helper (the planning process) has no state worth saving; its parent stops it in order, and
    a terminal's Ctrl-C reaching the whole process group must not break it before the parent
    has written its checkpoint. Idempotent, so it can run at the start of every task.
    """
    if parent_pid in _helper_of:
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    exit_with_parent(parent_pid, signal.SIGKILL)
    _helper_of.add(parent_pid)
