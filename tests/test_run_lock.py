"""A run directory belongs to one job at a time, and a crashed job does not keep it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from infinipipe.cli import main
from infinipipe.train.run_lock import RunDirBusy, run_dir_lock

HOLD = ("import sys, time\n"
        "from infinipipe.train.run_lock import run_dir_lock\n"
        "with run_dir_lock(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n")


@pytest.fixture
def holder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_second_lock_is_refused_naming_the_holders_pid_and_host(tmp_path, holder):
    with pytest.raises(RunDirBusy, match=rf"in use by pid {holder.pid} on host \S+"):
        with run_dir_lock(tmp_path):
            pass


def test_lock_of_a_killed_job_is_free_again(tmp_path, holder):
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with run_dir_lock(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / "job.lock").read_text()


def test_train_in_a_locked_run_dir_is_refused_and_touches_nothing(tmp_path, holder, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main(["train", "--no-progress", "--run-dir", str(tmp_path), "--training.steps=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("infinipipe train: error: run directory") and f"pid {holder.pid}" in err
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert not (tmp_path / "config.toml").exists()

