"""A Ctrl-C while a launcher starts its processes is neither lost nor a traceback in theirs; a stop
that cannot wait for the running step is overdue at once, one that can waits for it."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

from infinipipe.runtime.launch import children_deaf_to_stops
from infinipipe.runtime.signals import StopRequest


def stops_blocked(_: int) -> bool:
    return {signal.SIGINT, signal.SIGTERM} <= signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_processes_started_inside_hold_stops_back_and_the_starter_still_takes_them():
    got = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: got.append(signum))
    try:
        with children_deaf_to_stops():
            pool = mp.get_context("spawn").Pool(1)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            assert pool.map(stops_blocked, [0]) == [True]
        finally:
            pool.close()  # the worker leaves when told to: it would hold a terminating SIGTERM back
            pool.join()
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
