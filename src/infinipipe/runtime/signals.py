"""Stopping a job on request, and never outliving the process that started it.

A rank does not die on SIGTERM or SIGINT: `StopRequest` records the signal, the training loop
ends at its next step boundary (after a checkpoint), and where that boundary cannot come within
the grace (``STOP_GRACE_S`` unless the job sets its own), the request is *overdue*: at once when
the running step is expected to outlast it, else when the grace ends. An overdue stop ends the
process, so a stop takes bounded time even when a step cannot finish.
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
from collections.abc import Callable
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
        self.restore()

    def restore(self) -> None:
        """Give the signals back to the handlers from before (again on leaving: harmless)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _exit_for(signum: int) -> None:
    os._exit(128 + signum)


class StopRequest(StopSignals):
    """While entered, SIGTERM/SIGINT set ``signum`` instead of killing; later signals are ignored.

    ``overdue(signum)`` runs (on a thread of its own) when the stop cannot wait for the next step
    boundary: at once if ``busy_until`` (the monotonic time the running work is expected to end,
    set by the loop; 0 when unknown) lies past the grace, else ``grace_s`` after the signal. The
    signal is taken through the wakeup fd by a thread, not only by the Python handler: that runs
    on the main thread only when it returns to the interpreter, which a rank blocked in a
    collective or a long kernel may not do for minutes, and the grace counts from the signal.
    """

    def __init__(self, grace_s: float = STOP_GRACE_S, overdue: Callable[[int], None] = _exit_for):
        super().__init__()
        self.grace_s = grace_s
        self.overdue = overdue
        self.signum = 0
        self.busy_until = 0.0
        self._taken = threading.Lock()
        self._timer: threading.Timer | None = None
        self._wakeup: tuple[int, int] | None = None
        self._previous_wakeup = -1

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._take(signum)

    def _take(self, signum: int) -> None:
        with self._taken:
            if self.signum:
                return
            self.signum = signum
        late = self.busy_until > time.monotonic() + self.grace_s
        self._timer = threading.Timer(0.0 if late else self.grace_s, self.overdue, (signum,))
        self._timer.daemon = True
        self._timer.start()

    def _read_wakeups(self, fd: int) -> None:
        try:
            while data := os.read(fd, 64):
                for signum in data:
                    if signum in STOP_SIGNALS:
                        self._take(signum)
        finally:
            os.close(fd)

    def __enter__(self) -> Self:
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._wakeup = (read, write)
        self._previous_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        threading.Thread(target=self._read_wakeups, args=(read,), name="stop-signals", daemon=True).start()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        if self._timer is not None:
            self._timer.cancel()  # the loop ended in order: nothing is overdue
        signal.set_wakeup_fd(self._previous_wakeup)
        if self._wakeup is not None:
            os.close(self._wakeup[1])  # the reading thread sees the end, closes its side and leaves
            self._wakeup = None


class JobStopped(RuntimeError):
    """A stop (``signum``) ended the job before the ranks could end in order; ``said``: rank 0 has
    printed where it stopped (it left its step for a stop that could not wait), so nothing is to
    add; ``startup``: it came before every rank had started, so nothing ran."""

    def __init__(self, signum: int, why: str, said: bool = False, startup: bool = False):
        self.signum, self.said, self.startup = signum, said, startup
        super().__init__(f"stopped by {signal_name(signum)}: {why}")


class StopBeforeLaunch(StopSignals):
    """While a job is checked and prepared, before any rank starts, a stop signal ends it at once
    (`JobStopped`, ``startup``): there is nothing to save. Main thread only; elsewhere a no-op."""

    def _on_signal(self, signum: int, _frame: Any) -> None:
        raise JobStopped(signum, "during start-up; nothing was trained", startup=True)

    def __enter__(self) -> "StopBeforeLaunch":
        return super().__enter__() if threading.current_thread() is threading.main_thread() else self


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
