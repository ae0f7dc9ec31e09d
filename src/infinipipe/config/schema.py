"""Run configuration: TOML sections as frozen dataclasses, overridable from the command line.

Section and key names follow torchtitan's TOML where the concept is the same (``[job]``,
``[model]``, ``[training]``, ``[optimizer]``, ``[lr_scheduler]``, ``[parallelism]``,
``[checkpoint]``, ``[metrics]``, ``[comm]``), so its users can read our files at a glance. Data
settings live in ``[data]``, EPP's planner settings in ``[epp]`` and the machines' links, which the
cost model charges intra-stage collectives on, in ``[cluster]``.

The dataclass defaults *are* the embedded default run (``examples/default.toml`` spells them out
and a test keeps the two equal), so ``infinipipe train`` with no file needs nothing on disk.
Every key is checked on load: an unknown key, a wrong type or a bad value is a ``ValueError``
that names ``section.key``, because a typo silently falling back to a default wastes a GPU run.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from ..contract.layout import LinkModel, StageLayout, read_links
from ..contract.model_config import ModelConfig, preset
from ..contract.units import parse_bytes
from ..model.attention import BACKENDS
from ..planners.options import BEHIND_A_STEP, PlannerOptions


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _at_least(name: str, value: float, low: float) -> None:
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


@dataclass(frozen=True)
class JobConfig:
    """``stop_grace_seconds``: how long a stop signal may wait for the running step and its
    checkpoint; a step that cannot end inside it is dropped and the job ends at once from its last
    checkpoint. Keep it under the scheduler's kill delay (Slurm's KillWait, 30 s by default) and
    ask for the signal early enough before a time limit (``--signal=TERM@N``, N above it)."""

    dump_folder: str = "./outputs"
    description: str = ""
    stop_grace_seconds: float = 25.0

    def __post_init__(self) -> None:
        _at_least("job.stop_grace_seconds", self.stop_grace_seconds, 0.0)


@dataclass(frozen=True)
class ModelSection:
    """Which model: a preset (``flavor``), a local HF checkpoint (``hf_path``), plus size overrides.

    Size keys left out take the preset's value; they may not be combined with ``hf_path`` (the
    checkpoint fixes the shape). ``vocab_size`` left out follows ``data.vocab_size`` when the data
    section caps the vocabulary, so the embedding matches the token ids the data produces.
    """

    flavor: str = "tiny"
    hf_path: str = ""
    attention: str = "auto"
    vocab_size: int | None = None
    hidden: int | None = None
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    ffn: int | None = None
    rope_theta: float | None = None
    norm_eps: float | None = None
    tie_embeddings: bool | None = None

    SIZE_KEYS = ("vocab_size", "hidden", "layers", "heads", "kv_heads", "ffn", "rope_theta", "norm_eps",
                 "tie_embeddings")

    def __post_init__(self) -> None:
        _choice("model.attention", self.attention, BACKENDS)
        if self.hf_path:
            given = [k for k in self.SIZE_KEYS if getattr(self, k) is not None]
            if given:
                raise ValueError(f"model.{given[0]} cannot be set together with model.hf_path "
                                 "(the checkpoint's config.json fixes the model's shape)")
        else:
            try:
                preset(self.flavor)
            except ValueError as exc:
                raise ValueError(f"model.flavor: {exc}") from None


@dataclass(frozen=True)
class TrainingConfig:
    """Steps, seed, global batch, sequence length, precision and gradient clipping.

    The global batch is given either as a token budget (``global_batch_tokens``, the natural unit
    for skewed lengths: every step does about the same work) or as a sequence count
    (``global_batch_size``); exactly one must be > 0. ``seq_len`` is the longest sequence trained
    on: longer documents are truncated or rejected per ``data.over_long``. ``max_norm = 0`` turns
    gradient clipping off. ``deterministic = true`` makes a run repeat bit for bit (and a resume
    equal the run it continues): plans that depend on the batch alone (no planning deadline, pool,
    ILP time limit or warm start: each depends on wall time) and torch's deterministic kernels
    where it has them. The default plans within a share of the step instead, so how far a search
    gets, and the loss from the step where plans first differ, follows the machine's load.
    """

    steps: int = 30
    seed: int = 0
    deterministic: bool = False
    global_batch_tokens: int = 16384
    global_batch_size: int = 0
    seq_len: int = 8192
    mixed_precision: str = "fp32"
    max_norm: float = 1.0

    def __post_init__(self) -> None:
        _at_least("training.steps", self.steps, 1)
        _at_least("training.seed", self.seed, 0)
        _at_least("training.seq_len", self.seq_len, 2)
        _at_least("training.global_batch_tokens", self.global_batch_tokens, 0)
        _at_least("training.global_batch_size", self.global_batch_size, 0)
        if (self.global_batch_tokens > 0) == (self.global_batch_size > 0):
            raise ValueError("set exactly one of training.global_batch_tokens and training.global_batch_size "
                             f"(> 0), got {self.global_batch_tokens} and {self.global_batch_size}")
        if 0 < self.global_batch_tokens < self.seq_len:
            raise ValueError(f"training.global_batch_tokens ({self.global_batch_tokens}) must be >= "
                             f"training.seq_len ({self.seq_len}) so a longest sequence fits in a batch")
        _choice("training.mixed_precision", self.mixed_precision, ("fp32", "bf16"))
        _at_least("training.max_norm", self.max_norm, 0.0)


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "AdamW"
    lr: float = 3e-3
    eps: float = 1e-8
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95

    def __post_init__(self) -> None:
        _choice("optimizer.name", self.name, ("AdamW",))
        if not self.lr > 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.lr}")
        _at_least("optimizer.eps", self.eps, 0.0)
        _at_least("optimizer.weight_decay", self.weight_decay, 0.0)
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"optimizer.{key} must be in [0, 1), got {getattr(self, key)}")


@dataclass(frozen=True)
class LRSchedulerConfig:
    """Warmup, then constant, then decay over the last ``decay_ratio`` of the post-warmup steps.

    ``decay_ratio`` left out decays over all post-warmup steps (torchtitan's meaning).
    """

    warmup_steps: int = 5
    decay_ratio: float | None = None
    decay_type: str = "cosine"
    min_lr_factor: float = 0.1

    def __post_init__(self) -> None:
        _at_least("lr_scheduler.warmup_steps", self.warmup_steps, 0)
        if self.decay_ratio is not None and not 0.0 <= self.decay_ratio <= 1.0:
            raise ValueError(f"lr_scheduler.decay_ratio must be in [0, 1], got {self.decay_ratio}")
        _choice("lr_scheduler.decay_type", self.decay_type, ("linear", "sqrt", "cosine"))
        if not 0.0 <= self.min_lr_factor <= 1.0:
            raise ValueError(f"lr_scheduler.min_lr_factor must be in [0, 1], got {self.min_lr_factor}")

    def factor(self, step: int, total_steps: int) -> float:
        """LR multiplier for 0-based optimizer step ``step`` of ``total_steps`` (for ``LambdaLR``).

        A pure function of the step, so a resumed run gets the same LR as an uninterrupted one.
        """
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        after = max(total_steps - self.warmup_steps, 0)
        decay = after if self.decay_ratio is None else round(self.decay_ratio * after)
        start = total_steps - decay
        if decay == 0 or step < start:
            return 1.0
        p = min((step - start) / decay, 1.0)
        curve = {"linear": 1.0 - p, "sqrt": 1.0 - math.sqrt(p), "cosine": 0.5 * (1.0 + math.cos(math.pi * p))}
        return self.min_lr_factor + (1.0 - self.min_lr_factor) * curve[self.decay_type]


@dataclass(frozen=True)
class ParallelismConfig:
    """Parallel degrees; their product is the world size.

    ``pipeline_parallel_degree`` stages (across nodes); inside a stage,
    ``sequence_parallel_degree`` ranks run Ulysses sequence parallelism (a chunk's tokens spread
    over them, all-to-all around attention) and ``data_parallel_shard_degree`` ranks shard the
    stage FSDP-style (torchtitan's meaning; ``-1`` takes the ranks left): its parameters are sharded
    over the ``dp_shard x sp`` ranks; ``data_parallel_replicate_degree`` groups of those ranks hold
    replicas (of the whole stage, or of its shards: HSDP). Every data-parallel rank, replicate or
    shard, trains its own share of the batch. Ring-attention context parallelism and tensor
    parallelism are recognised keys so a torchtitan file reads, but only degree 1 is accepted.
    """

    pipeline_parallel_degree: int = 4
    data_parallel_shard_degree: int = 1
    data_parallel_replicate_degree: int = 1
    sequence_parallel_degree: int = 1
    context_parallel_degree: int = 1
    tensor_parallel_degree: int = 1

    def __post_init__(self) -> None:
        _at_least("parallelism.pipeline_parallel_degree", self.pipeline_parallel_degree, 1)
        _at_least("parallelism.data_parallel_replicate_degree", self.data_parallel_replicate_degree, 1)
        _at_least("parallelism.sequence_parallel_degree", self.sequence_parallel_degree, 1)
        if self.data_parallel_shard_degree == 0 or self.data_parallel_shard_degree < -1:
            raise ValueError("parallelism.data_parallel_shard_degree must be >= 1 or -1 (all remaining ranks), "
                             f"got {self.data_parallel_shard_degree}")
        for key in ("context_parallel_degree", "tensor_parallel_degree"):
            value = getattr(self, key)
            _at_least(f"parallelism.{key}", value, 1)
            if value > 1:
                hint = " (Ulysses sequence parallelism is parallelism.sequence_parallel_degree)" \
                    if key == "context_parallel_degree" else ""
                raise ValueError(f"parallelism.{key} = {value}: not supported yet (only 1){hint}")


@dataclass(frozen=True)
class ClusterConfig:
    """The GPUs of a node and the links the cost model charges SP and FSDP collectives on.

    Bandwidths are per GPU in Gbit/s (the defaults: NCCL's all-to-all bus bandwidth on an 8-GPU
    NVLink node, one 200 Gb/s InfiniBand port per GPU); ``links`` names a file written by
    ``infinipipe profile --links``, whose measured links replace the figures given here (one host
    measures only ``intra_node``).
    """

    gpus_per_node: int = 8
    intra_node_bandwidth_gbps: float = 1200.0
    intra_node_latency_us: float = 10.0
    inter_node_bandwidth_gbps: float = 200.0
    inter_node_latency_us: float = 10.0
    links: str = ""

    def __post_init__(self) -> None:
        _at_least("cluster.gpus_per_node", self.gpus_per_node, 1)
        for where in ("intra_node", "inter_node"):
            if not getattr(self, f"{where}_bandwidth_gbps") > 0:
                raise ValueError(f"cluster.{where}_bandwidth_gbps must be > 0, got {getattr(self, f'{where}_bandwidth_gbps')}")
            _at_least(f"cluster.{where}_latency_us", getattr(self, f"{where}_latency_us"), 0.0)
        if self.links:
            self.measured_links()

    def measured_links(self) -> dict[str, LinkModel]:
        if not self.links:
            return {}
        try:
            return read_links(self.links)
        except ValueError as exc:
            raise ValueError(f"cluster.links: {exc}") from None

    def stage_layout(self, sp: int = 1, fsdp: int = 1, dp_replicate: int = 1) -> StageLayout:
        """A stage of ``sp``-way SP whose parameters shard over ``fsdp`` ranks, gathered once per
        step (as the runtime does), ``dp_replicate`` replicas of it, on this cluster's links."""
        links = {where: LinkModel(getattr(self, f"{where}_latency_us") / 1e6,
                                  getattr(self, f"{where}_bandwidth_gbps") * 1e9 / 8)
                 for where in ("intra_node", "inter_node")}
        return StageLayout(sp=sp, fsdp=fsdp, reshard_per_chunk=False, gpus_per_node=self.gpus_per_node,
                           dp_replicate=dp_replicate, **{**links, **self.measured_links()})


@dataclass(frozen=True)
class CheckpointConfig:
    """``folder`` is relative to ``job.dump_folder``; ``keep_latest_k = 0`` keeps every checkpoint.

    On by default, so a job that is stopped or fails loses at most ``interval`` steps: rerunning
    the same command resumes. ``load_step = -1`` resumes from the newest intact checkpoint; ``N``
    resumes from ``step-N``.
    """

    enable: bool = True
    folder: str = "checkpoint"
    interval: int = 10
    keep_latest_k: int = 2
    load_step: int = -1

    def __post_init__(self) -> None:
        _at_least("checkpoint.interval", self.interval, 1)
        _at_least("checkpoint.keep_latest_k", self.keep_latest_k, 0)
        if self.load_step != -1:
            _at_least("checkpoint.load_step (-1 for the newest intact checkpoint)", self.load_step, 1)
            if not self.enable:
                raise ValueError("checkpoint.load_step needs checkpoint.enable = true")


@dataclass(frozen=True)
class MetricsConfig:
    log_freq: int = 1
    enable_tensorboard: bool = False
    save_tb_folder: str = "tb"

    def __post_init__(self) -> None:
        _at_least("metrics.log_freq", self.log_freq, 1)


@dataclass(frozen=True)
class CommConfig:
    init_timeout_seconds: int = 300
    train_timeout_seconds: int = 100

    def __post_init__(self) -> None:
        _at_least("comm.init_timeout_seconds", self.init_timeout_seconds, 1)
        _at_least("comm.train_timeout_seconds", self.train_timeout_seconds, 1)


DATA_SOURCES = ("stdlib", "jsonl", "text", "parquet")


@dataclass(frozen=True)
class DataConfig:
    """Where text comes from and how it becomes token ids.

    ``source = "stdlib"`` is the embedded corpus (this Python's standard library sources, present
    on every machine); the others read ``path``. ``tokenizer`` is ``cl100k_base``, ``o200k_base``
    or a local Hugging Face tokenizer path. ``vocab_size > 0`` maps the tokenizer onto that many
    ids (see ``infinipipe.data.tokenizer.VocabMap``) so small models stay small. ``max_docs > 0``
    keeps only the first documents, for quick runs. ``cache_dir = ""`` uses the user cache.
    """

    source: str = "stdlib"
    path: str = ""
    text_field: str = "text"
    tokenizer: str = "cl100k_base"
    vocab_size: int = 4096
    over_long: str = "truncate"
    min_doc_tokens: int = 2
    max_docs: int = 0
    cache_dir: str = ""

    def __post_init__(self) -> None:
        _choice("data.source", self.source, DATA_SOURCES)
        if self.source == "stdlib" and self.path:
            raise ValueError("data.path must be empty for data.source = 'stdlib'")
        if self.source != "stdlib" and not self.path:
            raise ValueError(f"data.path is required for data.source = {self.source!r}")
        if not self.tokenizer:
            raise ValueError("data.tokenizer must name a tokenizer ('cl100k_base', 'o200k_base' or a local path)")
        if self.vocab_size != 0:
            _at_least("data.vocab_size", self.vocab_size, 512)
        _choice("data.over_long", self.over_long, ("truncate", "reject"))
        _at_least("data.min_doc_tokens", self.min_doc_tokens, 2)
        _at_least("data.max_docs", self.max_docs, 0)


@dataclass(frozen=True)
class EPPConfig(PlannerOptions):
    """The planner, its memory budget per device and cost profile, plus every `PlannerOptions` knob.

    ``host_memory_budget`` is the host memory per device that offloaded activations and the
    optimizer state may fill ("0" turns the host tier off); it is used only where the profile
    has a host link (`HostLink`), and refused before launch where this machine cannot give it.

    ``profile = ""`` means the profile measured for (or shipped for) the device being used; a
    name or a JSON file path picks another. ``prefetch`` plans step i+1 while step i trains.
    A run plans behind a step, so the search has a deadline and a pool by default
    (`options.BEHIND_A_STEP`).
    """

    deadline_share: float = BEHIND_A_STEP["deadline_share"]
    pool_size: int = BEHIND_A_STEP["pool_size"]
    planner: str = "epp"
    memory_budget: str = "4GiB"
    host_memory_budget: str = "128GiB"
    profile: str = ""
    prefetch: bool = True

    FIELD_PREFIX: ClassVar[str] = "epp."

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.planner:
            raise ValueError("epp.planner must name a planner")
        parse_bytes(self.memory_budget, "epp.memory_budget")
        parse_bytes(self.host_memory_budget, "epp.host_memory_budget", allow_zero=True)

    @property
    def memory_budget_bytes(self) -> int:
        return parse_bytes(self.memory_budget, "epp.memory_budget")

    @property
    def host_memory_budget_bytes(self) -> int:
        return parse_bytes(self.host_memory_budget, "epp.host_memory_budget", allow_zero=True)


@dataclass(frozen=True)
class Config:
    job: JobConfig = field(default_factory=JobConfig)
    model: ModelSection = field(default_factory=ModelSection)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    data: DataConfig = field(default_factory=DataConfig)
    epp: EPPConfig = field(default_factory=EPPConfig)

    def __post_init__(self) -> None:
        if self.model.hf_path and self.data.vocab_size:
            if not (Path(self.model.hf_path) / "config.json").is_file():  # the cause, not its consequence
                raise ValueError(f"model.hf_path: no config.json in {self.model.hf_path!r}")
            raise ValueError("data.vocab_size must be 0 with model.hf_path: a pretrained model keeps its "
                             "tokenizer's vocabulary")
        if self.model.vocab_size is not None and self.data.vocab_size > self.model.vocab_size:
            raise ValueError(f"model.vocab_size ({self.model.vocab_size}) is smaller than data.vocab_size "
                             f"({self.data.vocab_size}): token ids would fall outside the embedding")

    def model_config(self) -> ModelConfig:
        """The model's shape: from the HF checkpoint's config.json, or the preset plus overrides."""
        if self.model.hf_path:
            from ..model.hf import read_hf_config

            return read_hf_config(self.model.hf_path)
        overrides = {k: getattr(self.model, k) for k in ModelSection.SIZE_KEYS if getattr(self.model, k) is not None}
        if "vocab_size" not in overrides and self.data.vocab_size:
            overrides["vocab_size"] = self.data.vocab_size
        base = preset(self.model.flavor).to_json()
        return ModelConfig.from_json({**base, **overrides})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict; keys left unset (None) are omitted, as they would be in a TOML file."""
        return {f.name: {k.name: getattr(getattr(self, f.name), k.name) for k in fields(getattr(self, f.name))
                         if getattr(getattr(self, f.name), k.name) is not None}
                for f in fields(self)}

    def to_toml(self) -> str:
        """TOML text that ``load_config`` reads back to an equal ``Config`` (saved into run dirs)."""
        lines: list[str] = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
            lines.append("")
        return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float) and not math.isfinite(value):
        return ("-inf" if value < 0 else "inf") if math.isinf(value) else "nan"
    return repr(value)
