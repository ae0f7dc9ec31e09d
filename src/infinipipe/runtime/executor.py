"""The stage executor: one process runs one stage's action list of a Plan.

Each rank owns a contiguous slice of layers (`StageModel`), receives activations or gradients
into buffers sized from the Plan, computes with `StageCompute` (K/V of split sequences kept on
the stage, per-chunk recompute), sends the result on, and accumulates gradients over every chunk
and pipeline of the step. With Ulysses SP each rank of a stage's SP group computes its share of
every chunk's tokens and exchanges only that share with the same SP rank of the neighbouring
stages; the SP group, then data-parallel replicas, sum their gradients; every token loss is
divided by the global batch's predicted tokens, so the sum is the exact global-batch gradient.
When a stage has several ``dp_shard x sp`` ranks its parameters are sharded over them with FSDP
(`fsdp.ShardedStage`: gathered once per step, reduce-scattered once after its backwards).
The optimizer step is the caller's: `PipelineWorker.weights` holds the parameters it steps. A
plan may keep the optimizer's state on the host during the step (`optimizer_host`); the worker
then moves the state of the optimizer it was given (`PipelineWorker.attach_optimizer`).
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..contract.cost import LOSS_BLOCK_TOKENS
from ..contract.ir import Plan, deferred_chunks, validate_plan
from ..contract.model_config import ModelConfig
from ..model.stage import StageModel, init_weights
from .batch import Batch
from .fsdp import ShardedStage
from .live_bytes import LiveBytesMeter
from .nccl_semantics import emulation_from_env
from .offload import HostTier, Offloader, copy_engine, late_copies_from_env, reload_points
from .optimizer_host import OptimizerOffload, optimizer_back_at, optimizer_out_wait
from .p2p import StageLink, TransferMismatch, plan_digest
from .p2p_order import input_of, output_of, stage_posts
from .parallel_dims import ParallelMesh
from .precision import MasterWeights
from .sequence_parallel import SequenceParallel, token_shares
from .stage_compute import StageCompute
from .stopwatch import Stopwatch

# Gradients are all-reduced in buckets of about this size, as DDP does: one flat copy of every
# gradient at once would add the stage's whole gradient bytes to its peak at the end of a step.
ALLREDUCE_BUCKET_BYTES = 25 * 2**20


def _buckets(tensors: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive tensors grouped up to ``limit`` bytes (a larger tensor is a bucket alone)."""
    out: list[list[torch.Tensor]] = []
    size = limit
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if size + nbytes > limit:
            out.append([])
            size = 0
        out[-1].append(t)
        size += nbytes
    return out


@dataclass(frozen=True)
class RuntimeSettings:
    """Plan-independent settings of a worker.

    ``recv_lookahead`` is how many input-needing actions ahead a receive is posted, so the
    transfer overlaps the current compute (where the stage's queue allows: `p2p_order`); ``seed``
    gives the same weights as `build_stages`.
    ``nccl_semantics`` makes P2P waits behave as under NCCL (see `nccl_semantics`); it defaults to
    the ``INFINIPIPE_NCCL_SEMANTICS`` environment variable. ``master_dtype`` keeps master weights
    and gradients in that dtype while the stage computes in ``dtype`` (`precision.MasterWeights`).
    ``count_live_bytes`` counts every tensor byte a CPU step allocates (each operator passes
    through a Python dispatch mode, so it is for tests and benchmarks); on CUDA the allocator's
    count is always read. ``late_copies`` completes offload copies late on CPU (`offload.LateCopies`;
    default: the ``INFINIPIPE_LATE_COPIES`` environment variable). ``host_tier_bytes`` is what the
    host tier for offloaded activations holds from the first step on (it grows between steps to
    what a step asked for, or to `PipelineWorker.run_step`'s ``host_room``; a step whose offloads
    do not fit keeps the rest on the device).
    """

    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    seed: int = 0
    attention_backend: str = "auto"
    loss_block_tokens: int = LOSS_BLOCK_TOKENS
    recv_lookahead: int = 1
    nccl_semantics: bool = field(default_factory=emulation_from_env)
    master_dtype: torch.dtype | None = None
    count_live_bytes: bool = False
    late_copies: bool = field(default_factory=late_copies_from_env)
    host_tier_bytes: int = 0

    def __post_init__(self) -> None:
        if self.recv_lookahead < 0:
            raise ValueError(f"recv_lookahead must be >= 0, got {self.recv_lookahead}")
        if self.loss_block_tokens < 1:
            raise ValueError(f"loss_block_tokens must be >= 1, got {self.loss_block_tokens}")


@dataclass(frozen=True)
class ActionTime:
    kind: str
    chunk_id: int
    compute_s: float


@dataclass(frozen=True)
class StepResult:
    """What one rank measured in one step. ``loss`` is the global batch's, on every rank.

    ``busy_s`` sums the compute of the stage's actions, ``idle_s`` is the rest of the pipeline
    phase (waiting for neighbours); the gradient reduction (all-reduce, or FSDP's reduce-scatter) is
    timed apart in ``allreduce_s``. ``peak_step_bytes`` is the most tensor bytes the step had
    allocated at once, counting from its start (activations, K/V stores, transients, gradients,
    communication buffers; what the simulator predicts as ``SimResult.peak_step_bytes``); None on
    CPU unless ``RuntimeSettings.count_live_bytes``. ``peak_host_bytes``: the most bytes of
    offloaded activations the host tier held at once (`SimResult.peak_host_bytes`), counted when
    ``peak_step_bytes`` is.
    """

    loss: float
    stage: int
    dp_rank: int
    step_s: float
    pipeline_s: float
    busy_s: float
    idle_s: float
    allreduce_s: float
    actions: tuple[ActionTime, ...]
    peak_step_bytes: int | None
    peak_host_bytes: int | None = None


class PipelineWorker:
    """Holds one stage of the model for a fixed layer split and runs any Plan made for that split.

    ``model`` computes; ``weights`` is what the optimizer steps and checkpoints hold (the master
    copy under mixed precision, else ``model`` itself), and its ``.grad`` the step's gradients.
    Under FSDP (``mesh.fsdp > 1``) ``model`` is sharded and is ``weights``: its fp32 shards are the
    master weights and FSDP gathers them in the compute dtype.
    """

    def __init__(self, cfg: ModelConfig, layers_per_stage: tuple[int, ...], mesh: ParallelMesh,
                 settings: RuntimeSettings = RuntimeSettings()):
        layers_per_stage = tuple(int(n) for n in layers_per_stage)
        if len(layers_per_stage) != mesh.pp:
            raise ValueError(f"layers_per_stage has {len(layers_per_stage)} entries for pp={mesh.pp} stages")
        if sum(layers_per_stage) != cfg.layers or min(layers_per_stage) < 1:
            raise ValueError(f"layers_per_stage {layers_per_stage} must be >= 1 each and sum to "
                             f"the model's {cfg.layers} layers")
        self.cfg, self.mesh, self.settings = cfg, mesh, settings
        self.layers_per_stage = layers_per_stage
        self.device = torch.device(settings.device)
        lo = sum(layers_per_stage[:mesh.stage])
        model = StageModel(cfg, range(lo, lo + layers_per_stage[mesh.stage]), first=mesh.stage == 0,
                           last=mesh.is_last_stage, backend=settings.attention_backend)
        init_weights(model, settings.seed)
        self.host_tier = HostTier(self.device, settings.host_tier_bytes)
        self.copies = copy_engine(self.device, settings.late_copies)
        self.sharded: ShardedStage | None = None
        self.masters: MasterWeights | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        if mesh.fsdp > 1:
            self.model = model.to(device=self.device, dtype=settings.master_dtype or settings.dtype)
            self.sharded = ShardedStage(self.model, mesh.shard_mesh, settings.dtype)
        else:
            master = copy.deepcopy(model).to(self.device, settings.master_dtype) if settings.master_dtype else None
            self.model = model.to(device=self.device, dtype=settings.dtype)
            self.masters = None if master is None else MasterWeights(self.model, master)

    @property
    def weights(self) -> torch.nn.Module:
        return self.model if self.masters is None else self.masters.master

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer that steps `weights`: its state waits on the host during a step whose plan
        says ``offload_optimizer``."""
        self.optimizer = optimizer

    def optimizer_state(self) -> list[torch.Tensor]:
        """What only the optimizer step reads: the master weights under mixed precision (FSDP's
        sharded parameters are then the masters) and the optimizer's per-parameter state (AdamW's
        moments: the tensors shaped like their parameter; its step count is a host scalar). Read
        between steps: during one, an FSDP stage's module holds the gathered weights instead."""
        params = list(self.weights.parameters())
        masters = params if self.settings.master_dtype is not None else []
        state = self.optimizer.state if self.optimizer is not None else {}
        moments = [t for p in params for t in state.get(p, {}).values()
                   if isinstance(t, torch.Tensor) and t.shape == p.shape]
        return masters + moments

    def refresh(self) -> None:
        """After the optimizer stepped `weights`: bring the computing model up to date."""
        if self.masters is not None:
            self.masters.refresh()

    def _agree_on_plan(self, digest: int) -> None:
        """All stages of this pipeline must run the same plan; one small all-gather per step."""
        group = self.mesh.pp_group
        mine = torch.tensor([digest], dtype=torch.long, device=self.device)
        every = [torch.empty_like(mine) for _ in range(self.mesh.pp)]
        dist.all_gather(every, mine, group=group)
        digests = [int(t.item()) for t in every]
        if len(set(digests)) > 1:
            raise TransferMismatch(
                f"stages of data-parallel replica {self.mesh.dp_rank} hold different plans "
                f"(digests per stage: {[hex(d) for d in digests]})")

    def _global_normaliser(self, batch: Batch) -> int:
        t = torch.tensor([batch.predicted_tokens], dtype=torch.long, device=self.device)
        if self.mesh.dp > 1:
            dist.all_reduce(t, group=self.mesh.dp_group)
        return int(t.item())

    def run_step(self, plan: Plan, batch: Batch, normaliser: int | None = None, host_room: int = 0) -> StepResult:
        """Run ``plan`` over this replica's ``batch``; gradients are left in ``model``'s ``.grad``.

        Gradients are reset first (one step is one global batch). ``normaliser`` defaults to the
        predicted tokens of the global batch (summed over data-parallel replicas). ``host_room``:
        the host-tier bytes the step is predicted to use (the simulator's host peak of this stage),
        which the tier grows to before the step so that the first step that offloads has room.
        Where the plan keeps the optimizer state on the host, it is back on the device, and the
        compute stream waits for it, when this returns.
        """
        validate_plan(plan)
        if plan.layers_per_stage != self.layers_per_stage:
            raise ValueError(f"plan splits layers as {plan.layers_per_stage}, this worker holds "
                             f"{self.layers_per_stage}")
        if plan.num_stages != self.mesh.pp:
            raise ValueError(f"plan has {plan.num_stages} stages, the mesh has pp={self.mesh.pp}")
        if tuple(batch.lengths) != plan.seq_lengths:
            raise ValueError(f"batch sequence lengths {batch.lengths} differ from the plan's {plan.seq_lengths}")
        stage, n_stages = self.mesh.stage, self.mesh.pp
        t_step = time.perf_counter()
        clock = Stopwatch(self.device)
        digest = plan_digest(plan)
        self._agree_on_plan(digest)
        if normaliser is None:
            normaliser = self._global_normaliser(batch)
        self.model.zero_grad(set_to_none=True)
        self.weights.zero_grad(set_to_none=True)
        # Read before FSDP's gather, which puts the whole weights in the module's place.
        back_at = optimizer_back_at(plan, stage)
        parked = OptimizerOffload(self.copies, self.host_tier, self.device,
                                  self.optimizer_state() if back_at is not None else ())
        if self.sharded is not None:
            self.sharded.begin_step()
        self.host_tier.begin_step(max(host_room, parked.room()))
        counted = self.device.type == "cuda" or self.settings.count_live_bytes
        meter = LiveBytesMeter(self.device) if counted else contextlib.nullcontext()
        mesh = self.mesh
        sp = SequenceParallel(mesh.sp_group, mesh.sp_rank, mesh.sp) if mesh.sp > 1 else None
        compute = StageCompute(self.model, batch, normaliser, self.settings.loss_block_tokens, sp, self.settings.dtype,
                               Offloader(self.copies, self.host_tier, self.device))
        actions = plan.stage_actions[stage]
        reloads = reload_points(actions)
        deferred = deferred_chunks(actions)
        tokens = [token_shares(c.tokens, mesh.sp)[mesh.sp_rank] for c in plan.chunks]

        link = StageLink(self.mesh.pp_group, stage, self.mesh.pp, self.cfg.hidden, self.settings.dtype,
                         self.device, digest, stage_posts(plan, stage, self.settings.recv_lookahead), tokens,
                         emulate_nccl=self.settings.nccl_semantics)
        spans: list[tuple[int, int]] = []
        losses: list[torch.Tensor] = []
        pipe_start = clock.mark()
        with meter:
            parked.leave()
            if optimizer_out_wait(plan, stage):
                parked.wait_out()
            for i, a in enumerate(actions):
                for cid in reloads.get(i, ()):
                    compute.reload(plan.chunks[cid])
                if i == back_at:
                    parked.back()
                parked.poll()
                link.post_next()
                chunk = plan.chunks[a.chunk_id]
                need = input_of(a, stage, n_stages)
                x = link.wait_recv(need.direction, a.chunk_id) if need is not None else None
                t0 = clock.mark()
                if a.kind == "F":
                    out = compute.forward(chunk, x, a.recompute_layers, a.elementwise_layers, a.offload_layers)
                elif a.kind == "B":
                    out = compute.backward(chunk, x, a.chunk_id in deferred)
                else:
                    out = compute.weights(chunk)
                spans.append((t0, clock.mark()))
                sent = output_of(a, stage, n_stages)
                if sent is not None:
                    link.send(sent.direction, a.chunk_id, out)
                elif a.kind == "F":
                    losses.append(out)
            if back_at == len(actions):
                parked.back()
            link.post_next()
            link.wait_sends()
            compute.finish()
            pipe_end = clock.mark()
            loss = self._reduce(torch.stack(losses).double().sum() if losses else None)
            red_end = clock.mark()
            parked.arrive()
        times = [ActionTime(a.kind, a.chunk_id, clock.seconds(*span)) for a, span in zip(actions, spans)]
        pipeline_s = clock.seconds(pipe_start, pipe_end)
        busy = sum(t.compute_s for t in times)
        allreduce_s = clock.seconds(pipe_end, red_end)
        return StepResult(
            loss=loss, stage=stage, dp_rank=self.mesh.dp_rank,
            step_s=time.perf_counter() - t_step, pipeline_s=pipeline_s, busy_s=busy,
            idle_s=max(0.0, pipeline_s - busy), allreduce_s=allreduce_s, actions=tuple(times),
            peak_step_bytes=meter.peak if counted else None, peak_host_bytes=meter.host_peak if counted else None,
        )

    def _reduce(self, local_loss: torch.Tensor | None) -> float:
        """Loss from the last stage to every stage, then both loss and gradients summed over the SP
        group (each SP rank computed its share of the tokens) and over replicas; under FSDP the
        gradients are already reduced (their shards summed over every data-parallel and SP rank).

        The loss stays on the device until here: reading it inside the pipeline would block the
        host on the compute stream mid-step.
        """
        mesh = self.mesh
        if self.sharded is not None:
            self.sharded.end_step()
        loss = torch.zeros(1, dtype=torch.float64, device=self.device)
        if local_loss is not None:
            loss += local_loss
        if mesh.pp > 1:
            dist.broadcast(loss, src=dist.get_global_rank(mesh.pp_group, mesh.pp - 1), group=mesh.pp_group)
        groups = ([mesh.sp_group] if mesh.sp > 1 else []) + ([mesh.dp_group] if mesh.dp > 1 else [])
        for group in groups:
            dist.all_reduce(loss, group=group)
        if groups and self.sharded is None:
            for p in self.weights.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            for bucket in _buckets([p.grad for p in self.weights.parameters()], ALLREDUCE_BUCKET_BYTES):
                flat = _flatten_dense_tensors(bucket)
                for group in groups:
                    dist.all_reduce(flat, group=group)
                for g, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    g.copy_(reduced)
        return float(loss.item())
