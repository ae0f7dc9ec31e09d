"""The training job: data once, then one process per (replica, stage) running planned steps.

Rank 0 plans (in a background process when ``epp.prefetch`` is on, so step i+1 is planned while
step i trains) and broadcasts each step's plans; every rank samples the same global batch from
``(seed, step)``, trains its replica's share, and the optimizer steps after gradients are summed.
Rank 0 writes ``metrics.jsonl``, the progress bar and the checkpoints' pointer.

A stop signal to any rank reaches rank 0 with the step's gathered results; rank 0 then
broadcasts "stop" instead of the next step's plans, so every rank ends after the same step and
writes one consistent checkpoint.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from ..config import Config
from ..data.dataset import TokenDataset, build_dataset, build_sampler
from ..planners.search_pool import resolve_pool_size
from ..planners.stage_layers import balance_layers
from ..runtime.batch import Batch
from ..runtime.executor import PipelineWorker, RuntimeSettings, StepResult
from ..runtime.fsdp import full_tensor
from ..runtime.launch import init_from_env, launch_local, under_torchrun
from ..runtime.parallel_dims import ParallelDims, ParallelMesh
from ..runtime.signals import StopRequest, serve_parent, signal_name
from .checkpoint import CheckpointJob, checkpoint_run, resume_checkpoint, save_checkpoint
from .console import banner, measured_bubble, resume_line, say, step_line
from .layout_change import layout_notice
from .metrics import MetricsWriter
from .notices import warn
from .optim import build_optimizer
from .overdue_stop import JobProgress, leave_now, peer_stopped
from .planning import PlanAsk, PlanAsks, StepPlanner, StepPlans, job_cost, run_planner_options
from .prefetch import PlanPrefetcher
from .run_dir import check_run_dir, make_run_dir
from .run_lock import RunDirBusy, check_free, run_dir_lock
from .validate import JobShape, check_checkpoints, check_config, check_first_step

FAILURE = "failure.txt"
PRECISIONS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, torch.float32)}


@dataclass(frozen=True)
class TrainResult:
    """What rank 0 saw: per-step losses (first step first) and throughput; ``stop_signal`` is the
    signal that ended the job early (0 when it ran every step); ``documents`` counts the corpus's
    documents by what the length policy did to them (kept, truncated, rejected, too_short)."""

    start_step: int
    losses: tuple[float, ...]
    tokens: int
    wall_s: float
    run_dir: str
    stop_signal: int = 0
    documents: tuple[tuple[str, int], ...] = ()

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


def run_training(cfg: Config, run_dir: str | Path, *, progress: bool = True,
                 timeout_s: float = 24 * 3600) -> TrainResult | None:
    """Run the job of ``cfg``: under torchrun on this rank, else as local gloo processes on CPU.

    Returns rank 0's result; under torchrun the other ranks get ``None`` (they print nothing).
    """
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    shape = check_config(cfg)
    if under_torchrun():
        make_run_dir(run_dir)
        device = init_from_env(collective_timeout_s=cfg.comm.train_timeout_seconds)
        return _torchrun_rank(cfg, shape, run_dir, device, progress)
    with contextlib.ExitStack() as held:
        check_free(run_dir)
        dataset = _prepare(cfg, shape, run_dir)  # a refused job leaves the directory and its lock file alone
        make_run_dir(run_dir)
        lock = held.enter_context(run_dir_lock(run_dir, cfg.job.stop_grace_seconds))
        check_checkpoints(cfg, run_dir)  # again, now that no other job can write them
        _claim_run_dir(cfg, run_dir)
        world = ParallelDims.from_config(cfg.parallelism).world_size
        for line in banner(cfg, run_dir, dataset, "cpu (local gloo processes)", world, shape.layers_per_stage):
            say(line)
        threads = max(1, (os.cpu_count() or 1) // world)
        results = launch_local(_rank_main, world, args=(cfg, str(run_dir), dataset, "cpu", progress),
                               threads=threads, collective_timeout_s=cfg.comm.train_timeout_seconds,
                               timeout_s=timeout_s, inherit_fds=(lock,), stop_grace_s=cfg.job.stop_grace_seconds)
    return results[0]


def _torchrun_rank(cfg: Config, shape: JobShape, run_dir: Path, device: str, progress: bool) -> TrainResult | None:
    """This rank of a torchrun job: rank 0 locks the run directory and speaks for the job."""
    try:
        with contextlib.ExitStack() as held:
            refusal = [_lock_run_dir(run_dir, held, cfg) if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(refusal, src=0)
            if refusal[0] is not None:
                raise RunDirBusy(refusal[0])
            dataset = _prepare(cfg, shape, run_dir)
            if dist.get_rank() == 0:
                _claim_run_dir(cfg, run_dir)
                for line in banner(cfg, run_dir, dataset, device, dist.get_world_size(), shape.layers_per_stage):
                    say(line)
            return _rank_main(cfg, str(run_dir), dataset, device, progress)
    finally:
        dist.destroy_process_group()


def _lock_run_dir(run_dir: Path, held: contextlib.ExitStack, cfg: Config) -> str | None:
    """Lock ``run_dir`` for the rest of ``held``; else why another job has it."""
    try:
        held.enter_context(run_dir_lock(run_dir, cfg.job.stop_grace_seconds))
    except RunDirBusy as exc:
        return str(exc)
    return None


def _prepare(cfg: Config, shape: JobShape, run_dir: Path) -> TokenDataset:
    """The checks that need the run directory or the corpus: the checkpoint to resume (its
    manifest, file sizes and model), then the corpus holds at least one global batch and the first
    step can be planned. All before any rank starts, and before the directory is written to."""
    check_checkpoints(cfg, run_dir)
    dataset, _ = build_dataset(cfg)
    check_first_step(cfg, dataset, shape)
    return dataset


def _claim_run_dir(cfg: Config, run_dir: Path) -> None:
    """Record the job's config, and set a previous job's failure report aside (failure.txt is
    always the newest job's)."""
    tmp = run_dir / "config.toml.tmp"
    tmp.write_text(cfg.to_toml())
    os.replace(tmp, run_dir / "config.toml")
    failure = run_dir / FAILURE
    if failure.exists():
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(failure.stat().st_mtime))
        aside, n = run_dir / f"failure-{stamp}.txt", 1
        while aside.exists():
            aside, n = run_dir / f"failure-{stamp}-{n}.txt", n + 1
        os.replace(failure, aside)


def _clip(worker: PipelineWorker, mesh: ParallelMesh, max_norm: float) -> float:
    """Global gradient norm over every stage (replicas agree after their all-reduce; FSDP shards'
    norms are combined over the shard group); clip to it."""
    params = [p for p in worker.weights.parameters() if p.grad is not None]
    local = full_tensor(torch.nn.utils.get_total_norm([p.grad for p in params])).double() ** 2
    if mesh.pp > 1:
        dist.all_reduce(local, group=mesh.pp_group)
    total = local.sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def _record(step: int, sp: StepPlans, results: list[dict], tokens: int, step_s: float, lr: float,
            grad_norm: float, loss: float, wait_s: float, hidden: bool) -> dict:
    predicted = sp.predicted
    stages = sorted(results, key=lambda r: (r["dp"], r["stage"]))
    return {
        "step": step + 1,
        "loss": loss,
        "tokens": tokens,
        "step_time_s": step_s,
        "tokens_per_s": tokens / step_s if step_s > 0 else 0.0,
        "lr": lr,
        "grad_norm": grad_norm,
        "bubble_ratio_measured": measured_bubble(stages),
        "bubble_ratio_predicted": predicted["bubble_ratio"],
        "iteration_time_predicted_s": predicted["iteration_time_s"],
        "peak_step_bytes": [r["peak_step_bytes"] for r in stages],
        "peak_step_bytes_predicted": predicted["peak_step_bytes"],
        "peak_host_bytes": [r.get("peak_host_bytes") for r in stages],
        "peak_host_bytes_predicted": predicted["peak_host_bytes"],
        "offloaded_bytes_predicted": predicted["offloaded_bytes"],
        "exposed_copy_s_predicted": predicted["exposed_copy_s"],
        "planning_s": sp.planning_s,
        "plan_wait_s": wait_s,
        "planning_hidden": hidden,
        "planning_deadline_s": sp.deadline_s,
        "planning_skipped": sp.skipped_for_time,
        "plan": [
            {"planner": p.metadata.get("planner"), "num_chunks": len(p.chunks), "num_pipelines": len(p.pipelines),
             "sequences": len(p.seq_lengths), "max_len": max(p.seq_lengths),
             "num_slices": p.metadata.get("num_slices"), "chunking": p.metadata.get("chunking"),
             "split_sequences": len({s.seq_id for c in p.chunks for s in c.segments
                                     if s.length < p.seq_lengths[s.seq_id]})}
            for p in sp.plans
        ],
    }


@dataclass(frozen=True)
class _BackgroundPlanner:
    """The step planner as the planning process runs it: a helper that dies with rank 0."""

    planner: StepPlanner
    rank0_pid: int

    def __call__(self, ask: PlanAsk) -> StepPlans:
        serve_parent(self.rank0_pid)
        return self.planner(ask)


def _deterministic_kernels() -> None:
    """torch's deterministic kernels where it has them (a warning names an op that has none);
    cuBLAS needs its workspace fixed before its first call for that."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def _save(where: JobProgress, folder: Path, done: int, weights, optimizer, scheduler, cfg: Config,
          job: CheckpointJob | None) -> tuple[float, Path]:
    """Write step ``done``'s checkpoint; returns how long it took (what a stop waits for) and the folder."""
    where.phase, t0 = "checkpoint", time.perf_counter()
    where.checkpoint = save_checkpoint(folder, done, weights, optimizer, scheduler, cfg.checkpoint.keep_latest_k, job)
    where.phase = "between"
    return time.perf_counter() - t0, where.checkpoint


def _stop_line(signum: int, done: int, steps: int, checkpoint: Path | None, cfg: Config) -> str:
    where = f"stopped by {signal_name(signum)} after step {done} of {steps}"
    enabled = cfg.checkpoint.enable
    if checkpoint is not None:
        chosen = " without checkpoint.load_step" if cfg.checkpoint.load_step != -1 else ""
        return f"{where}; checkpoint {checkpoint}; to resume, run the same command again{chosen}"
    if not enabled:
        return f"{where}; no checkpoint (checkpoint.enable is false), so a rerun starts from step 0"
    return f"{where}; nothing trained yet, so a rerun starts from step 0"


def _rank_main(cfg: Config, run_dir: str, dataset: TokenDataset, device: str, progress: bool) -> TrainResult | None:
    """One rank's job. A stop that cannot wait for a step boundary ends the process from here
    (`overdue_stop`): when its grace runs out, or when a collective fails because a peer left for it."""
    where = JobProgress(cfg.training.steps, cfg.job.stop_grace_seconds, cfg.checkpoint.enable)
    with StopRequest(cfg.job.stop_grace_seconds, overdue=lambda signum: leave_now(signum, where)) as stop:
        stop.busy_until = math.inf  # start-up: nothing to save, a stop leaves at once
        try:
            return _train(cfg, run_dir, dataset, device, progress, stop, where)
        except Exception:
            if signum := peer_stopped():  # its collective failed because a peer left for a stop
                leave_now(signum, where)
            raise


def _train(cfg: Config, run_dir: str, dataset: TokenDataset, device: str, progress: bool,
           stop: StopRequest, where: JobProgress) -> TrainResult | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.training.deterministic:
        _deterministic_kernels()
    dims = ParallelDims.from_config(cfg.parallelism, world)
    pp = dims.pp
    mesh = dims.build_mesh(torch.device(device).type)
    model_cfg = cfg.model_config()
    dtype, master_dtype = PRECISIONS[cfg.training.mixed_precision]
    cost = job_cost(cfg, model_cfg, dims)
    layers = balance_layers(cost, pp)
    worker = PipelineWorker(model_cfg, layers, mesh, RuntimeSettings(
        dtype=dtype, master_dtype=master_dtype, device=device, seed=cfg.training.seed,
        attention_backend=cfg.model.attention))
    weights = worker.weights
    if cfg.model.hf_path:
        from ..model.hf import read_hf_tensors

        # Whole tensors on every rank; under FSDP each rank keeps its shards.
        set_model_state_dict(weights, read_hf_tensors(cfg.model.hf_path, weights.state_dict()),
                             options=StateDictOptions(full_state_dict=True))
        worker.refresh()
    optimizer, scheduler = build_optimizer(cfg, weights.parameters())
    worker.attach_optimizer(optimizer)
    steps = cfg.training.steps
    ckpt_dir = Path(run_dir) / cfg.checkpoint.folder
    start, checkpoint = 0, None
    if cfg.checkpoint.enable:
        start, checkpoint = resume_checkpoint(ckpt_dir, weights, optimizer, scheduler, cfg.checkpoint.load_step)
        worker.refresh()
        if rank == 0 and checkpoint is not None:
            say(resume_line(start, steps, checkpoint))
            if (notice := layout_notice(checkpoint, cfg, world)) is not None:
                warn(notice)
    where.done, where.checkpoint = start, checkpoint
    # A resumed job continues its checkpoint's run: its metrics rows and checkpoints carry that id.
    run = (checkpoint_run(checkpoint) if checkpoint is not None else None) or uuid.uuid4().hex[:12]
    job = CheckpointJob(run, cfg.to_toml()) if rank == 0 else None
    sampler = build_sampler(cfg, dataset)
    memory = cfg.epp.memory_budget_bytes
    options = run_planner_options(cfg)
    # The planning process and its pool run on rank 0's node, beside that node's training ranks.
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    options = replace(options, pool_size=resolve_pool_size(options.pool_size, ranks_here))
    # a warm start is the last step's winner: a resume, which has none, would plan differently
    planner = StepPlanner(cost, sampler, cfg.epp.planner, pp, mesh.dp, memory, layers, options,
                          cfg.epp.host_memory_budget_bytes, warm_start=not cfg.training.deterministic)
    root = rank == 0
    losses: list[float] = []
    tokens = 0
    stopping = 0  # rank 0: the first stop signal any rank has reported
    done = saved = start
    with contextlib.ExitStack() as stack:
        plans = None
        asks = PlanAsks(start, steps)
        if root:
            if cfg.epp.prefetch:
                plans = stack.enter_context(PlanPrefetcher(_BackgroundPlanner(planner, os.getpid()), asks,
                                                           on_result=asks.learned))
            else:
                plans = asks.planned_by(planner)
        metrics = None
        bar = None
        if root:
            tb = Path(run_dir) / cfg.metrics.save_tb_folder if cfg.metrics.enable_tensorboard else None
            metrics = MetricsWriter(run_dir, tb, resume_step=start, run=run)
            stack.callback(metrics.close)
            if progress:
                from tqdm import tqdm

                bar = stack.enter_context(tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True))
        t_start = time.perf_counter()
        train_s = save_s = 0.0  # the last step's and checkpoint's time: how long a stop would wait for the next
        for step in range(start, steps):
            t0 = time.perf_counter()
            where.phase = "between"
            if root:
                stopping = stopping or stop.signum
            sp, wait_s = None, 0.0
            if root and not stopping:
                sp = next(plans)
                wait_s = time.perf_counter() - t0
            box = [(stopping, sp) if root else None]
            dist.broadcast_object_list(box, src=0)
            stopping, sp = box[0]
            if stopping:
                break
            if sp.step != step:
                raise RuntimeError(f"received the plans of step {sp.step} at step {step}")
            where.phase, t_train = "step", time.perf_counter()
            stop.busy_until = time.monotonic() + train_s + save_s if train_s else 0.0
            gb = sampler.batch(dataset, step)
            share = sp.shares[mesh.dp_rank]
            batch = Batch(tuple(gb.sequences[i] for i in share))
            res: StepResult = worker.run_step(sp.plans[mesh.dp_rank], batch, normaliser=gb.predicted_tokens,
                                              host_room=sp.host_room(mesh.dp_rank, mesh.stage))
            if not math.isfinite(res.loss):
                raise FloatingPointError(f"step {step + 1}: loss is {res.loss}")
            grad_norm = _clip(worker, mesh, cfg.training.max_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            worker.refresh()
            scheduler.step()
            mine = {"stage": res.stage, "dp": res.dp_rank, "busy_s": res.busy_s, "pipeline_s": res.pipeline_s,
                    "peak_step_bytes": res.peak_step_bytes, "peak_host_bytes": res.peak_host_bytes,
                    "signal": stop.signum}
            gathered = [None] * world if root else None
            dist.gather_object(mine, gathered, dst=0)
            step_s, train_s = time.perf_counter() - t0, time.perf_counter() - t_train
            asks.stepped(step_s - wait_s)
            done = where.done = step + 1
            where.phase, stop.busy_until = "between", 0.0
            if root:
                stopping = next((r["signal"] for r in gathered if r["signal"]), 0)
                losses.append(res.loss)
                tokens += gb.num_tokens
                if (step + 1) % cfg.metrics.log_freq == 0 or step + 1 == steps:
                    record = _record(step, sp, gathered, gb.num_tokens, step_s, lr, grad_norm, res.loss,
                                     wait_s, bool(getattr(plans, "ready", False)))
                    metrics.write(record)
                    if bar is None:
                        say(step_line(record))
                if bar is not None:
                    bar.set_postfix(loss=f"{res.loss:.3f}", tok_s=f"{gb.num_tokens / step_s:,.0f}",
                                    bubble=f"{measured_bubble(gathered):.0%}",
                                    plan_s=f"{sp.planning_s:.2f}")
                    bar.update(1)
            if cfg.checkpoint.enable and (done % cfg.checkpoint.interval == 0 or done == steps):
                save_s, checkpoint = _save(where, ckpt_dir, done, weights, optimizer, scheduler, cfg, job)
                saved = done
        wall = time.perf_counter() - t_start
        if done == steps:
            stopping = 0  # a signal during the last step changes nothing: the job is complete
        if stopping and cfg.checkpoint.enable and done > saved:
            stop.busy_until = time.monotonic() + save_s if save_s else 0.0
            _, checkpoint = _save(where, ckpt_dir, done, weights, optimizer, scheduler, cfg, job)
    if not root:
        return None
    if stopping:
        print(_stop_line(stopping, done, steps, checkpoint, cfg), file=sys.stderr, flush=True)
    documents = (("kept", len(dataset)), ("truncated", dataset.truncated), ("rejected", dataset.rejected),
                 ("too_short", dataset.too_short))
    return TrainResult(start, tuple(losses), tokens, wall, run_dir, stopping, documents)
