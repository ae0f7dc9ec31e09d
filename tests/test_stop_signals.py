"""A Ctrl-C while a launcher starts its processes is neither lost nor a traceback in theirs."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal

from infinipipe.runtime.launch import children_deaf_to_sigint


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
