"""A job as a cluster sees it: exit codes, signals, one job per run directory."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infinipipe.train.run_lock import run_dir_lock

pytestmark = pytest.mark.slow

SMALL_RUN = ["--data.max_docs=120", "--training.seq_len=2048", "--training.global_batch_tokens=4096",
             "--lr_scheduler.warmup_steps=3", "--epp.memory_budget=96MiB",
             "--parallelism.pipeline_parallel_degree=2"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("token-cache"))


def _train_args(run_dir, cache_dir, *extra: str) -> list[str]:
    return ["-m", "infinipipe.cli", "train", "--no-progress", "--run-dir", str(run_dir),
            f"--data.cache_dir={cache_dir}", *SMALL_RUN, *extra]


@pytest.mark.parametrize("grace", ["25", "0"])
def test_torchrun_job_exits_0_with_one_line_when_stopped_in_order_or_when_its_step_outlasts_the_grace(
        tmp_path, cache_dir, grace):
    """torchrun reads any other status as a failure and prints its own traceback; a stop that
    reaches the ranks (as a scheduler sends it) ends in order, with one summary from rank 0, or,
    where the step cannot end within job.stop_grace_seconds (a GPU step of minutes against
    Slurm's KillWait), at once from the last checkpoint, naming it and the step dropped."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *_train_args(tmp_path / "run", cache_dir, *STOP_RUN, "--checkpoint.interval=2",
                        f"--job.stop_grace_seconds={grace}")]
    with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:
        agent = subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # step-2 checkpointed
        assert agent.poll() is None and time.monotonic() < deadline, (tmp_path / "err").read_text()[-3000:]
        time.sleep(0.2)
    for rank in _children(agent.pid):  # a scheduler's stop reaches the ranks
        os.kill(rank, signal.SIGTERM)
    assert agent.wait(timeout=60) == 0, (tmp_path / "err").read_text()[-3000:]
    stderr, stdout = (tmp_path / "err").read_text(), (tmp_path / "out").read_text()
    assert "ChildFailedError" not in stderr and "Traceback" not in stderr
    assert len([line for line in stderr.splitlines() if line.startswith("stopped by")]) == 1, stderr[-3000:]
    if grace == "0":
        _left_at_once(stderr, tmp_path / "run")
        assert "trained" not in stdout
        return
    done = int(re.search(r"stopped by SIGTERM after step (\d+) of 40; checkpoint \S+; to resume", stderr).group(1))
    assert stdout.count(f"trained {done} step(s)") == 1
    assert re.search(r"^data: [\d,]+ documents; \d+ longer than training.seq_len = 2,048 truncated to it "
                     r"\(data.over_long = 'truncate'", stdout, re.M)
    assert len(metrics.read_text().splitlines()) == done


def _left_at_once(stderr: str, run_dir: Path) -> None:
    """The one line of a stop that could not wait for its step: the step dropped (or the checkpoint
    not written) and the last checkpoint, which a rerun resumes from."""
    (line,) = [x for x in stderr.splitlines() if x.startswith("stopped by")]
    kept = int(re.search(r"^stopped by SIGTERM (during step \d+ of 40, which could not end|after step \d+ of 40, whose "
                         r"checkpoint could not be written) within job.stop_grace_seconds = 0(; the step was dropped)?; "
                         r"last checkpoint \S+/step-(\d+); to resume from it, run the same command again$",
                         line).group(3))
    assert (run_dir / "checkpoint" / "latest").read_text() == f"step-{kept}\n"


def _session_processes(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``: the job started with a session of its own."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def _children(pid: int) -> list[int]:
    return sorted(int(c) for t in Path(f"/proc/{pid}/task").iterdir()
                  for c in (t / "children").read_text().split())


class Job:
    """``infinipipe train`` in a session of its own, its output in files."""

    def __init__(self, run_dir: Path, cache_dir: str, *extra: str):
        self.run_dir = run_dir
        self.out, self.err = run_dir.parent / f"{run_dir.name}.out", run_dir.parent / f"{run_dir.name}.err"
        self.tmp = run_dir.parent / f"{run_dir.name}.tmp"  # the job's TMPDIR
        self.tmp.mkdir()
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, *_train_args(run_dir, cache_dir, *extra)],
                                         stdout=out, stderr=err, start_new_session=True,
                                         env={**os.environ, "TMPDIR": str(self.tmp)})

    def wait_for_output(self, text: str, limit_s: float = 120) -> None:
        deadline = time.monotonic() + limit_s
        while text not in self.out.read_text():
            assert self.proc.poll() is None, f"the job ended early: {self.err.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} on stdout within {limit_s} s"
            time.sleep(0.05)

    def wait_for_rows(self, n: int, limit_s: float = 240) -> None:
        metrics = self.run_dir / "metrics.jsonl"
        deadline = time.monotonic() + limit_s
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
            assert self.proc.poll() is None, f"the job ended early: {self.err.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {n} metrics rows within {limit_s} s"
            time.sleep(0.2)

    def ranks(self) -> list[int]:
        """Rank pids (spawned children of the launcher), rank 0 first: it alone has a planner child."""
        spawned = [c for c in _children(self.proc.pid)
                   if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        return sorted(spawned, key=lambda c: not _children(c))

    def gone_within(self, limit_s: float) -> float:
        """Seconds until no process of the job is left; fails past ``limit_s``."""
        t0 = time.monotonic()
        while True:
            self.proc.poll()
            left = _session_processes(self.proc.pid)
            if not left:
                return time.monotonic() - t0
            if time.monotonic() - t0 > limit_s:
                for pid in left:
                    os.kill(pid, signal.SIGKILL)
                pytest.fail(f"processes {left} of the job were still alive {limit_s} s after the signal")
            time.sleep(0.2)


STOP_RUN = ["--training.steps=40", "--checkpoint.enable=true", "--checkpoint.interval=100"]
# A job that must still be training after a second job has started and been refused (seconds of
# start-up on a loaded machine): far more steps than it will run.
LONG_RUN = ["--training.steps=4000", *STOP_RUN[1:]]


@pytest.mark.parametrize("target, sig, code", [
    # ("main", SIGTERM) is test_second_job_on_a_running_jobs_run_dir_is_refused_naming_the_holder's stop
    ("main", signal.SIGINT, 128 + signal.SIGINT),
    ("group", signal.SIGINT, 128 + signal.SIGINT),  # Ctrl-C in a terminal: every process of the job
    ("rank 1", signal.SIGTERM, 128 + signal.SIGTERM),
    ("main", signal.SIGKILL, -signal.SIGKILL),  # the ranks notice their launcher is gone
])
def test_stop_signal_checkpoints_and_leaves_no_process_of_the_job_within_30s(tmp_path, cache_dir, target, sig, code):
    job = Job(tmp_path / "run", cache_dir, *STOP_RUN)
    job.wait_for_rows(2)
    ranks = job.ranks()
    if target == "main":
        os.kill(job.proc.pid, sig)
    elif target == "group":
        os.killpg(job.proc.pid, sig)
    else:
        os.kill(job.ranks()[1], sig)
    if sig == signal.SIGKILL:  # the ranks, still running, hold the run directory until they end
        job.proc.wait()
        with run_dir_lock(job.run_dir):
            assert not set(ranks) & set(_session_processes(job.proc.pid)), "a rerun would overlap the ranks"
    _stopped_with_a_checkpoint(job, sig, code)


def test_stop_to_one_rank_whose_step_outlasts_the_grace_ends_the_job_at_once_naming_the_last_checkpoint(
        tmp_path, cache_dir):
    """The signalled rank leaves at once; the other finds its collective failing, learns that a stop
    (not a fault) took its peer, and leaves too: exit 143 and the one line, no error."""
    job = Job(tmp_path / "run", cache_dir, *STOP_RUN, "--checkpoint.interval=2", "--job.stop_grace_seconds=0")
    job.wait_for_rows(3)
    os.kill(job.ranks()[1], signal.SIGTERM)
    assert job.gone_within(15) < 15
    assert job.proc.wait() == 128 + signal.SIGTERM
    err = job.err.read_text()
    assert "error" not in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-3000:]
    _left_at_once(err, job.run_dir)


def _stopped_with_a_checkpoint(job: Job, sig: signal.Signals, code: int, steps: int = 40) -> None:
    """No process of the job within 30 s, exit ``code``, one stop line, a checkpoint at the step it
    names (of the job's ``steps``)."""
    assert job.gone_within(30) < 30
    assert job.proc.wait() == code
    assert not list(job.tmp.glob("infinipipe-launch-*")), "the launcher's results folder was left behind"
    stop = [line for line in job.err.read_text().splitlines() if line.startswith("stopped by")]
    assert len(stop) == 1, job.err.read_text()[-3000:]
    reason = signal.SIGTERM if sig == signal.SIGKILL else sig
    done = int(re.search(rf"stopped by {reason.name} after step (\d+) of {steps}; checkpoint (\S+); "
                         r"to resume, run the same command again", stop[0]).group(1))
    assert 2 <= done < steps
    assert (job.run_dir / "checkpoint" / "latest").read_text().strip() == f"step-{done}"
    assert len((job.run_dir / "metrics.jsonl").read_text().splitlines()) == done


@pytest.fixture(scope="module")
def refused_then_stopped(tmp_path_factory, cache_dir) -> tuple[Job, subprocess.CompletedProcess]:
    """A job, a second job on its run directory while it trains, then the first job's SIGTERM
    stop: (the first job, signalled; the second's result). Its checkpoint also serves the resume
    below (one launch for the stop, the refusal and the resharding)."""
    first = Job(tmp_path_factory.mktemp("refused") / "run", cache_dir, *LONG_RUN)
    first.wait_for_rows(2)
    second = subprocess.run([sys.executable, *_train_args(first.run_dir, cache_dir, *LONG_RUN)],
                            capture_output=True, text=True, timeout=120)
    os.kill(first.proc.pid, signal.SIGTERM)
    return first, second


def test_second_job_on_a_running_jobs_run_dir_is_refused_naming_the_holder(refused_then_stopped):
    """Then the first job's SIGTERM stop, checked as the other stop signals are (one launch for both)."""
    first, second = refused_then_stopped
    assert second.returncode == 2
    assert f"is in use by pid {first.proc.pid} on host" in second.stderr
    assert "Traceback" not in second.stderr
    _stopped_with_a_checkpoint(first, signal.SIGTERM, 128 + signal.SIGTERM, steps=4000)


def test_failed_checkpoint_write_is_one_error_line_naming_it_with_the_tracebacks_in_the_run_dir(tmp_path, cache_dir):
    (tmp_path / "checkpoint").write_text("a file where the checkpoints' folder should be")
    (tmp_path / "failure.txt").write_text("the report of an earlier job\n")
    cmd = [sys.executable, *_train_args(tmp_path, cache_dir, "--training.steps=1", "--checkpoint.enable=true")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("infinipipe train: error:")]
    assert re.match(r"infinipipe train: error: cannot write checkpoint "
                    rf"{re.escape(str(tmp_path / 'checkpoint' / 'step-1'))}: File exists .* "
                    r"\(tracebacks: .*failure.txt\)", line), line
    assert "Traceback" not in proc.stderr
    assert "Traceback" in (tmp_path / "failure.txt").read_text()
    (earlier,) = tmp_path.glob("failure-*.txt")
    assert earlier.read_text() == "the report of an earlier job\n"


@pytest.mark.parametrize("sig, delay_s", [(signal.SIGINT, 0.0), (signal.SIGTERM, 2.0)])
def test_stop_while_the_ranks_start_ends_the_job_within_seconds_saying_nothing_was_trained(tmp_path, cache_dir,
                                                                                           sig, delay_s):
    """No further rank starts, the started ones leave at once (they hold nothing to save)."""
    job = Job(tmp_path / "run", cache_dir, *STOP_RUN)
    job.wait_for_output("run directory:")  # the banner's last line: the ranks are being started
    time.sleep(delay_s)
    os.kill(job.proc.pid, sig)
    assert job.gone_within(10) < 10
    assert job.proc.wait() == 128 + sig
    err = job.err.read_text()
    assert err.strip().splitlines() == [f"stopped by {sig.name} during start-up; nothing was trained"], err[-3000:]
    assert not (job.run_dir / "metrics.jsonl").exists()


def test_resume_with_a_larger_pipeline_degree_reshards_and_damage_only_hashes_find_is_bad_input(tmp_path, cache_dir,
                                                                                             refused_then_stopped):
    """From the pp=2 checkpoint of the job stopped by SIGTERM above (a copy of its run directory)."""
    stopped, _ = refused_then_stopped
    stopped.gone_within(30)  # what the stop left is checked above; here only its end is awaited
    done = int((stopped.run_dir / "checkpoint" / "latest").read_text().strip().removeprefix("step-"))
    shutil.copytree(stopped.run_dir, tmp_path, dirs_exist_ok=True)
    args = _train_args(tmp_path, cache_dir, *STOP_RUN[1:])  # only the steps and the pipeline degree change
    second = subprocess.run([sys.executable, *args, f"--training.steps={done + 1}",
                             "--parallelism.pipeline_parallel_degree=4"], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (f"checkpoint step-{done} was written by 2 rank(s) (pp=2, dp_replicate=1, dp_shard=1, sp=1); this job has 4 "
            "rank(s) (pp=4, dp_replicate=1, dp_shard=1, sp=1): weights and optimizer state are resharded by "
            "parameter name; ranks 2-3 had no saved random state") in second.stderr
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, done + 2)) and len({r["run"] for r in rows}) == 1

    # damage the contents (not the sizes) of every checkpoint: only the ranks' hashes can tell
    for shard in (tmp_path / "checkpoint").glob("step-*/__0_0.distcp"):
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    third = subprocess.run([sys.executable, *args, f"--training.steps={done + 2}"], capture_output=True, text=True,
                           timeout=300)
    assert third.returncode == 2, third.stderr[-3000:]
    (line,) = [x for x in third.stderr.splitlines() if x.startswith("infinipipe train: error:")]
    assert line.startswith(f"infinipipe train: error: no intact checkpoint in {tmp_path / 'checkpoint'}"), line
