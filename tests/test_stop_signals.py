"""A Ctrl-C while a launcher starts its processes is neither lost nor a traceback in theirs; a stop
that cannot wait for the running step is overdue at once, one that can waits for it."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

from infinipipe.runtime.launch import children_deaf_to_sigint
from infinipipe.runtime.signals import StopRequest


def sigint_blocked(_: int) -> bool:
    return signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_processes_started_inside_hold_sigint_back_and_the_starter_still_takes_it():
    got = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: got.append(signum))
    try:
        with children_deaf_to_sigint(), mp.get_context("spawn").Pool(1) as pool:
            os.kill(os.getpid(), signal.SIGINT)
            assert pool.map(sigint_blocked, [0]) == [True]
        assert got == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_stop_is_overdue_at_once_when_the_running_step_would_outlast_the_grace():
    overdue = []
    with StopRequest(grace_s=30.0, overdue=overdue.append) as stop:
        stop.busy_until = time.monotonic() + 60.0  # the step under way ends in a minute
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while not overdue and time.monotonic() < deadline:
            time.sleep(0.01)
    assert overdue == [signal.SIGTERM] and stop.signum == signal.SIGTERM


def test_stop_waits_for_a_step_that_ends_inside_the_grace_and_a_second_signal_changes_nothing():
    overdue = []
    with StopRequest(grace_s=30.0, overdue=overdue.append) as stop:
        stop.busy_until = time.monotonic() + 1.0
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.3)
    time.sleep(0.1)
    assert overdue == [] and stop.signum == signal.SIGTERM
