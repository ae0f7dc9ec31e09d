"""Cost model: time and memory of a chunk on a stage, from fitted per-layer coefficients.

Time per layer follows the paper's form: an attention term proportional to the number of
(query, key) pairs a chunk attends (quadratic in a segment, bilinear in a slice and its cached
prefix), a per-token term and a fixed per-chunk overhead, with separate forward and backward
coefficients. The first stage adds the embedding and the last stage the final norm, LM head and
loss, both linear in tokens. Memory is linear in tokens per layer (plus an attention-area term
for back-ends that keep the attention matrix), so it can be written straight into the
checkpointing ILP.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .host import HostLink
from .ir import check_format_version
from .layout import StageLayout
from .model_config import ModelConfig, preset
from .shapes import FEATURES, ChunkShape

PROFILE_FORMAT_VERSION = 1

DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
LOSS_BLOCK_TOKENS = 2048  # tokens per block of the blocked cross-entropy (runtime and cost model agree)


@dataclass(frozen=True)
class LinearTerm:
    """``sum(coef[f] * feature[f])`` over the named features (missing ones count 0)."""

    coef: Mapping[str, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_items", tuple(self.coef.items()))

    def __call__(self, shape: ChunkShape) -> float:
        feats = shape.features
        total = 0.0
        for k, v in self._items:  # a plain loop: planners evaluate terms hundreds of thousands of times
            total += v * feats[k]
        return total

    def to_json(self) -> dict[str, float]:
        return dict(self.coef)

    @classmethod
    def from_json(cls, obj: Mapping[str, float]) -> "LinearTerm":
        unknown = set(obj) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown cost feature(s) {sorted(unknown)}; known: {FEATURES}")
        return cls({k: float(v) for k, v in obj.items()})


TERM_NAMES = ("layer_fwd", "layer_bwd", "layer_act_bytes", "head_fwd", "head_bwd", "embed_fwd", "embed_bwd",
              "head_work_bytes", "action_fwd", "action_bwd")
WORK_TERM_NAMES = ("layer_fwd_work_bytes", "layer_bwd_work_bytes")
# An elementwise-recompute layer (`DecoderLayer` run ``elementwise``): the bytes it keeps fewer
# than a stored layer, and the milliseconds its backward spends recomputing them. Optional: a
# profile without them offers no elementwise recompute.
ELEMENTWISE_TERM_NAMES = ("layer_elementwise_bytes", "layer_elementwise_ms")
# Work memory as a share of a layer's per-token activation bytes, for profiles that did not
# measure it: this runtime's LLaMA-7B layer in bf16 with varlen flash attention holds 0.70 of its
# kept bytes per token during a no-grad forward and 0.14 during backward (plus one weight matrix's
# gradient per chunk); the fp32 CPU layers measure 0.62 and 0.31.
FWD_WORK_SHARE = 0.70
BWD_WORK_SHARE = 0.14


@dataclass(frozen=True)
class Profile:
    """Fitted coefficients for one (device, dtype, model shape), with where they came from.

    Times are milliseconds, memory bytes. ``layer_*`` are per decoder layer; ``embed_*`` belong
    to the first stage and ``head_*`` (final norm, LM head, blocked loss) to the last.
    ``action_*`` is what the runtime adds to any stage's forward or backward of a chunk, whatever
    its layers (chunk metadata, the checkpoint wrapper, detaching and handing on the output).
    ``layer_fwd_work_bytes`` is what one layer's forward holds for a moment when it keeps nothing
    (a checkpointed layer: intermediates alive between its ops), ``layer_bwd_work_bytes`` what
    one layer's backward holds beyond the activations it frees (gradients in flight); profiles
    measured before these were recorded estimate them from ``layer_act_bytes`` (`CostModel`).
    ``layer_elementwise_bytes`` and ``layer_elementwise_ms`` (`ELEMENTWISE_TERM_NAMES`) are what a
    layer run in elementwise-recompute mode keeps fewer and adds to its backward; without them the
    checkpointing choice is between storing a layer and recomputing it whole. ``host_link`` is the
    device's pinned copies to its host and the host memory behind them (`HostLink`); without it
    nothing is offloaded.
    """

    model: ModelConfig
    device: str
    dtype: str
    layer_fwd: LinearTerm
    layer_bwd: LinearTerm
    layer_act_bytes: LinearTerm
    head_fwd: LinearTerm = LinearTerm({})
    head_bwd: LinearTerm = LinearTerm({})
    embed_fwd: LinearTerm = LinearTerm({})
    embed_bwd: LinearTerm = LinearTerm({})
    head_work_bytes: LinearTerm = LinearTerm({})
    action_fwd: LinearTerm = LinearTerm({})
    action_bwd: LinearTerm = LinearTerm({})
    layer_fwd_work_bytes: LinearTerm | None = None
    layer_bwd_work_bytes: LinearTerm | None = None
    layer_elementwise_bytes: LinearTerm | None = None
    layer_elementwise_ms: LinearTerm | None = None
    host_link: HostLink | None = None
    torch_version: str = ""
    source: str = ""
    derived_from: str | None = None
    fit_error: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        names = TERM_NAMES + tuple(n for n in WORK_TERM_NAMES + ELEMENTWISE_TERM_NAMES if getattr(self, n) is not None)
        return {
            "version": PROFILE_FORMAT_VERSION,
            "device": self.device,
            "dtype": self.dtype,
            "torch": self.torch_version,
            "source": self.source,
            "derived_from": self.derived_from,
            "model": self.model.to_json(),
            "terms": {
                name: getattr(self, name).to_json() for name in names
            },
            "fit_error": self.fit_error,
        } | ({"host_link": self.host_link.to_json()} if self.host_link else {})

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Profile":
        check_format_version(obj, PROFILE_FORMAT_VERSION, "profile")
        if obj.get("dtype") not in DTYPE_BYTES:
            raise ValueError(f"profile dtype {obj.get('dtype')!r} is not one of {sorted(DTYPE_BYTES)}")
        terms = {k: LinearTerm.from_json(v) for k, v in obj["terms"].items()}
        return cls(
            model=ModelConfig.from_json(obj["model"]),
            device=obj["device"],
            dtype=obj["dtype"],
            torch_version=obj.get("torch", ""),
            source=obj.get("source", ""),
            derived_from=obj.get("derived_from"),
            fit_error=dict(obj.get("fit_error", {})),
            host_link=HostLink.from_json(obj["host_link"]) if obj.get("host_link") else None,
            **terms,
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        return cls.from_json(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class OptimizerStates:
    """Bytes per parameter for weights, gradients and optimizer state (AdamW in fp32 by default)."""

    param_bytes: int = 4
    grad_bytes: int = 4
    state_bytes: int = 8

    @property
    def per_param(self) -> int:
        return self.param_bytes + self.grad_bytes + self.state_bytes


# bf16 weights that compute; fp32 gradients accumulated in the master copy; fp32 master weights
# and two AdamW moments.
MIXED_PRECISION_ADAM = OptimizerStates(param_bytes=2, grad_bytes=4, state_bytes=12)


def training_states(dtype: str) -> OptimizerStates:
    """The model-state bytes of a run that computes in ``dtype``: fp32 AdamW for float32,
    mixed precision (half-precision weights, fp32 gradients, master weights and moments) else."""
    return OptimizerStates() if dtype == "float32" else MIXED_PRECISION_ADAM


@dataclass(frozen=True)
class ChunkMemory:
    """A chunk's bytes on a stage of ``n`` layers as a function of ``r``, its recomputed layers,
    and ``e``, its elementwise-recompute layers (``r + e <= n``).

    Checkpointed layers are the first ``r`` and elementwise ones the next ``e``, so backward frees
    the stored layers before it rematerialises anything: the rematerialised layer (``slope``)
    adds to the peak only when every layer is recomputed, and so does a checkpointed forward's
    transient (``fwd_extra``, at most ``slope``), which a stored layer's own activations otherwise
    cover. Likewise an elementwise layer's recomputed tensors (``bwd_e_extra``, at most
    ``e_slope``) and its forward's transient (``fwd_e_extra``) add only when no layer is stored.
    Each extra is the same capped function of what the layer does not keep, so what recomputing
    saves is ``(slope - e_slope - x + x_e) min(r, n) + (x - x_e) min(r, n - 1)
    + (e_slope - x_e) min(r + e, n) + x_e min(r + e, n - 1)`` (``x``: the action's extra) with
    every coefficient non-negative: concave, the form the checkpointing ILP takes.
    """

    n: int
    base: float
    slope: float
    fwd_work: float
    fwd_extra: float
    bwd_work: float
    bwd_extra: float
    e_slope: float = 0.0
    fwd_e_extra: float = 0.0
    bwd_e_extra: float = 0.0

    def held(self, r: int, e: int = 0) -> float:
        """Kept from the end of the forward to the end of the backward."""
        return self.base - r * self.slope - e * self.e_slope

    def _extra(self, r: int, e: int, full: float, elementwise: float) -> float:
        if r == self.n:
            return full
        return elementwise if e and r + e == self.n else 0.0

    def during_forward(self, r: int, e: int = 0) -> float:
        return self.held(r, e) + self.fwd_work + self._extra(r, e, self.fwd_extra, self.fwd_e_extra)

    def during_backward(self, r: int, e: int = 0) -> float:
        return self.held(r, e) + self.bwd_work + self._extra(r, e, self.bwd_extra, self.bwd_e_extra)

    def row(self) -> tuple[float, ...]:
        """held(0), slope, fwd_work, fwd_extra, bwd_work, bwd_extra, e_slope, fwd_e_extra,
        bwd_e_extra: the terms as one array row."""
        return (self.base, self.slope, self.fwd_work, self.fwd_extra, self.bwd_work, self.bwd_extra,
                self.e_slope, self.fwd_e_extra, self.bwd_e_extra)


@dataclass(frozen=True)
class CostModel:
    """Time and memory of a chunk on a stage holding ``n`` layers, from a `Profile`.

    ``model`` may differ from the profile's only in its number of layers (layers are identical,
    so a profile of a few layers serves the whole model); any other difference is refused.
    ``optimizer`` defaults to what training in the profile's precision keeps (`training_states`).
    ``layout`` says how many ranks run the stage: with Ulysses SP of degree ``sp`` each rank
    computes ``1/sp`` of the tokens' projections and MLP and ``ceil(heads/sp)`` heads of
    attention (the slowest rank sets the pace), pays the fixed per-chunk overhead whole, keeps
    ``1/sp`` of the activations, and adds two all-to-alls per layer in forward (Q, K and V in one,
    as the runtime sends them, then the output) and two in backward (their gradients). FSDP costs
    and memory follow `StageLayout`. With the default layout (one rank per stage) every figure
    is the profile's own. With ``optimizer_on_host`` the optimizer state (fp32 master weights and
    moments) lives on the host during a step (`optimizer_host_bytes`): out of `model_state_bytes`.
    ``host_budget`` is the host memory one device may fill (offloaded activations and that
    optimizer state); 0, or a profile without a `HostLink`, plans no offload.
    """

    profile: Profile
    model: ModelConfig
    optimizer: OptimizerStates | None = None
    layout: StageLayout = StageLayout()
    optimizer_on_host: bool = False
    host_budget: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer is None:  # a run trains in its profile's precision (the planner checks it)
            object.__setattr__(self, "optimizer", training_states(self.profile.dtype))
        if self.host_budget < 0:
            raise ValueError(f"host_budget must be >= 0 bytes, got {self.host_budget}")
        if self.model.cost_shape() != self.profile.model.cost_shape():
            raise ValueError(
                f"profile was made for model shape {self.profile.model.to_json()}, "
                f"not {self.model.to_json()}"
            )
        sp = self.layout.sp
        heads = math.ceil(self.model.heads / sp) / self.model.heads
        scale = {"attn": heads, "mask_area": heads, "kv": heads, "tokens": 1 / sp, "chunk": 1.0, "extra_segments": 1.0}
        for name in ("layer_fwd", "layer_bwd", "layer_act_bytes", "head_fwd", "head_bwd", "embed_fwd", "embed_bwd"):
            term = getattr(self.profile, name)
            object.__setattr__(self, f"_{name}", LinearTerm({k: v * scale[k] for k, v in term.coef.items()}))
        for name in ELEMENTWISE_TERM_NAMES:
            term = getattr(self.profile, name)
            object.__setattr__(self, f"_{name}", term and LinearTerm({k: v * scale[k] for k, v in term.coef.items()}))
        for name, share in zip(WORK_TERM_NAMES, (FWD_WORK_SHARE, BWD_WORK_SHARE)):
            term = getattr(self.profile, name)
            if term is None:
                term = LinearTerm({"tokens": share * self.profile.layer_act_bytes.coef.get("tokens", 0.0)})
            object.__setattr__(self, f"_{name}", LinearTerm({k: v * scale[k] for k, v in term.coef.items()}))
        object.__setattr__(self, "_kv_share", math.ceil(self.model.kv_heads / sp) / self.model.kv_heads)
        # Bytes one rank sends through a layer's all-to-alls (Q, K, V, output), per token of the chunk.
        object.__setattr__(self, "_a2a_bytes_per_token",
                           (2 * self.model.hidden + 2 * self.model.kv_dim) * self.dtype_bytes / sp)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.profile.dtype]

    def _stage(self, layer: float, embed: float, head: float, n_layers: int, first: bool, last: bool) -> float:
        return n_layers * layer + (embed if first else 0.0) + (head if last else 0.0)

    def all_to_all_ms(self, shape: ChunkShape) -> float:
        """One layer's two Ulysses all-to-alls, Q/K/V fused and output (forward; backward moves the same bytes)."""
        if self.layout.sp == 1:
            return 0.0
        return self.layout.all_to_all_s(shape.tokens * self._a2a_bytes_per_token, 2) * 1e3

    def _stage_params(self, n_layers: int, first: bool, last: bool) -> int:
        params = n_layers * self.model.layer_params()
        if first:
            params += self.model.embedding_params()
        if last:
            params += self.model.head_params()
        return params

    def _per_chunk_fsdp_ms(self, n_layers: int, first: bool, last: bool, backward: bool) -> float:
        """ZeRO-3 traffic of one chunk on a stage: gather the weights (and in backward
        reduce-scatter the gradients); 0 unless the layout reshards per chunk."""
        if not self.layout.reshard_per_chunk:
            return 0.0
        params = self._stage_params(n_layers, first, last)
        ms = self.layout.fsdp_s(params * self.optimizer.param_bytes) * 1e3
        return ms + self.layout.fsdp_s(params * self.optimizer.grad_bytes) * 1e3 if backward else ms

    def forward_ms(self, shape: ChunkShape, n_layers: int, first: bool = False, last: bool = False) -> float:
        compute = self._stage(self._layer_fwd(shape) + self.all_to_all_ms(shape), self._embed_fwd(shape),
                              self._head_fwd(shape), n_layers, first, last) + self.profile.action_fwd(shape)
        return max(compute, self._per_chunk_fsdp_ms(n_layers, first, last, backward=False))

    def backward_ms(self, shape: ChunkShape, n_layers: int, first: bool = False, last: bool = False) -> float:
        """Backward alone, without recompute."""
        compute = self._stage(self._layer_bwd(shape) + self.all_to_all_ms(shape), self._embed_bwd(shape),
                              self._head_bwd(shape), n_layers, first, last) + self.profile.action_bwd(shape)
        return max(compute, self._per_chunk_fsdp_ms(n_layers, first, last, backward=True))

    def action_ms(self, kind: str, shape: ChunkShape, n_layers: int, first: bool = False, last: bool = False,
                  deferred: bool = False) -> float:
        """An action's time without recompute: a forward, a backward (less its layers' weight
        gradients where ``deferred`` to a W action), or that W."""
        if kind == "F":
            return self.forward_ms(shape, n_layers, first, last)
        if kind == "W":
            return self.weight_grad_ms(shape, n_layers)
        return self.backward_ms(shape, n_layers, first, last) - (self.weight_grad_ms(shape, n_layers) if deferred else 0.0)

    def weight_grad_ms(self, shape: ChunkShape, n_layers: int) -> float:
        """The part of a backward that deferring its layers' weight gradients moves into a W action
        (`Action`): each projection's weight gradient is one matmul of the forward's size over the
        chunk's tokens, so it takes the forward's per-token time of the layers (derived from the
        profile, not measured apart: the forward's per-token term also holds its norms and RoPE,
        so this is an upper bound). Attention's backward, the costly part of long slices, has no
        weights and stays in the backward."""
        return n_layers * self._layer_fwd.coef.get("tokens", 0.0) * shape.tokens

    def deferred_weight_bytes(self, shape: ChunkShape, n_layers: int, grads_only: bool = False) -> float:
        """What a backward that defers its layers' weight gradients keeps until its W action: per
        layer and token, each projection's input (Q/K/V's and gate/up's normalised input, the
        attention output, the SwiGLU product) and output gradient (``grads_only``: the gradients
        alone, which the backward allocates anew; the inputs are activations it would free)."""
        cfg = self.model
        q = cfg.heads * cfg.head_dim
        inputs = 0 if grads_only else 2 * cfg.hidden + q + cfg.ffn
        grads = q + 2 * cfg.kv_dim + cfg.hidden + 2 * cfg.ffn + cfg.hidden
        return n_layers * shape.tokens * (inputs + grads) * self.dtype_bytes / self.layout.sp

    @property
    def elementwise(self) -> bool:
        """Whether the profile offers elementwise recompute (`ELEMENTWISE_TERM_NAMES`)."""
        return self._layer_elementwise_bytes is not None and self._layer_elementwise_ms is not None

    def recompute_ms(self, shape: ChunkShape, layers: int, elementwise: int = 0) -> float:
        """Recomputing ``layers`` checkpointed layers costs their forward once more; each of
        ``elementwise`` layers its norms' outputs and SwiGLU product (no matmul, no collective)."""
        ms = layers * (self._layer_fwd(shape) + self.all_to_all_ms(shape))
        if elementwise:
            if not self.elementwise:
                raise ValueError("the profile has no elementwise-recompute terms (layer_elementwise_bytes/_ms)")
            ms += elementwise * self._layer_elementwise_ms(shape)
        return ms

    def elementwise_saved_bytes(self, shape: ChunkShape) -> float:
        """Bytes one elementwise-recompute layer keeps fewer than a stored one (0 without the terms),
        never more than checkpointing the layer saves."""
        if not self.elementwise:
            return 0.0
        return min(self._layer_elementwise_bytes(shape), self.layer_act_bytes(shape) - self.ckpt_layer_bytes(shape))

    def step_fsdp_s(self, n_layers: int, first: bool = False, last: bool = False) -> tuple[float, float]:
        """Once-per-step FSDP traffic of a stage (seconds): the all-gather before its first
        forward and the gradient reduce-scatter after its last backward; (0, 0) unless the layout
        shards and gathers once per step."""
        if self.layout.reshard_per_chunk or self.layout.fsdp == 1:
            return 0.0, 0.0
        params = self._stage_params(n_layers, first, last)
        return (self.layout.fsdp_s(params * self.optimizer.param_bytes),
                self.layout.fsdp_s(params * self.optimizer.grad_bytes))

    def boundary_bytes(self, shape: ChunkShape) -> float:
        """Hidden states one rank sends to the next stage for a chunk (its 1/sp of the tokens)."""
        return shape.tokens * self.model.hidden * self.dtype_bytes / self.layout.sp

    def layer_act_bytes(self, shape: ChunkShape) -> float:
        """Bytes one fully stored layer keeps for backward.

        The profile's ``kv`` term is the K/V rows attention keeps; a split sequence's rows are its
        store's (`kv_bytes`), charged once per sequence rather than per layer and slice.
        """
        term = self._layer_act_bytes
        return term(shape) - term.coef.get("kv", 0.0) * shape.store_rows

    def ckpt_layer_bytes(self, shape: ChunkShape) -> float:
        """A checkpointed layer keeps only its input (hidden states)."""
        return shape.tokens * self.model.hidden * self.dtype_bytes / self.layout.sp

    def kv_bytes(self, shape: ChunkShape, n_layers: int) -> float:
        """The K/V store of a split sequence, whole-sequence sized, held by its first slice from
        that slice's forward to its backward (kept even on checkpointed layers); under SP each
        rank keeps the heads it owns."""
        return 2 * shape.kept * self.model.kv_dim * self.dtype_bytes * n_layers * self._kv_share

    def dkv_bytes(self, shape: ChunkShape, n_layers: int) -> float:
        """The store's dK/dV, where later slices' gradients accumulate for earlier slices: allocated
        when the sequence's backward begins (its last slice's), dropped after its first slice's
        (`gradient_store_spans`), so a sequence waiting in forward does not hold it."""
        return self.kv_bytes(shape, n_layers)

    def activation_bytes(self, shape: ChunkShape, n_layers: int, recompute: int = 0,
                         first: bool = False, last: bool = False, elementwise: int = 0) -> float:
        """Everything a chunk keeps on a stage from its forward until its backward (a split
        sequence's dK/dV, held over its backwards only, is `dkv_bytes`)."""
        if not 0 <= recompute <= n_layers or not 0 <= elementwise <= n_layers - recompute:
            raise ValueError(f"recompute {recompute} and elementwise {elementwise} layers outside 0..{n_layers}")
        full = n_layers - recompute
        total = full * self.layer_act_bytes(shape) + recompute * self.ckpt_layer_bytes(shape)
        total -= elementwise * self.elementwise_saved_bytes(shape)
        total += self.kv_bytes(shape, n_layers)
        if first:
            total += shape.tokens * 8 / self.layout.sp  # token ids kept by the embedding's backward
        # The last stage keeps its final norm's input; any other keeps its output, the root its
        # backward starts from when the next stage's gradient arrives.
        total += shape.tokens * self.model.hidden * self.dtype_bytes / self.layout.sp
        return total

    def chunk_memory(self, shape: ChunkShape, n_layers: int, first: bool = False, last: bool = False) -> ChunkMemory:
        """What a chunk holds on a stage during its forward, between, and during its backward.

        The running action's transient is its layers' (their output or incoming gradient, a
        backward's work, a checkpointed forward's intermediates, a rematerialised layer) or, in a
        forward on the last stage when larger, the loss's: its working memory beside the last
        layer's output, whose gradient it forms (`model.loss`). The loss's backward forms nothing.
        """
        base = self.activation_bytes(shape, n_layers, 0, first, last)
        slope = self.layer_act_bytes(shape) - self.ckpt_layer_bytes(shape)
        e_slope = self.elementwise_saved_bytes(shape)
        boundary = self.boundary_bytes(shape)
        fwd = boundary + (self.head_work_bytes(shape) if last else 0.0)
        fwd_full = max(fwd, self._layer_fwd_work_bytes(shape))
        bwd = self._layer_bwd_work_bytes(shape) + boundary
        # What a layer brings back (all it does not keep, or an elementwise layer's part) adds to
        # the forward up to its no-grad work, and to the backward whole.
        return ChunkMemory(n_layers, base, slope, fwd_work=fwd, fwd_extra=min(fwd_full - fwd, slope),
                           bwd_work=bwd, bwd_extra=slope, e_slope=e_slope,
                           fwd_e_extra=min(fwd_full - fwd, e_slope), bwd_e_extra=e_slope)

    def head_work_bytes(self, shape: ChunkShape) -> float:
        """Transient working memory of the blocked loss on the last stage.

        The profile's term is one full token block's logits and gradients; a chunk shorter than a
        block only ever forms its own tokens' logits (under SP, its rank's share of them).
        """
        return self.profile.head_work_bytes(shape) * min(1.0, shape.tokens / self.layout.sp / LOSS_BLOCK_TOKENS)

    def all_model_state_bytes(self, n_layers: int, first: bool = False, last: bool = False) -> float:
        """Parameters, gradients and optimizer state of a stage on one rank.

        Sharded over ``fsdp`` ranks once per step: gathered weights and accumulated gradients are
        whole, the optimizer state and a master copy of the weights are sharded. Per chunk (ZeRO-3,
        the paper's Eqs. 5-10): everything is sharded, plus two gathered layers (the one computing
        and the one prefetched) and one layer's whole gradients. The last stage also holds the
        final norm's and LM head's weight gradients that the loss forms in forward, whole and in
        the computing weights' dtype, until a backward takes them (`model.loss.HeadGradients`).
        """
        params = self._stage_params(n_layers, first, last)
        opt, d = self.optimizer, self.layout.fsdp
        head = self._head_grad_bytes(last)
        if d == 1:
            return params * opt.per_param + head
        if not self.layout.reshard_per_chunk:
            return params * (opt.param_bytes + opt.grad_bytes) + params * (opt.param_bytes + opt.state_bytes) / d + head
        layer = self.model.layer_params()
        return params * opt.per_param / d + layer * (2 * opt.param_bytes + opt.grad_bytes) + head

    def model_state_bytes(self, n_layers: int, first: bool = False, last: bool = False) -> float:
        """What a stage keeps on the device through a step: `all_model_state_bytes` less the
        optimizer state where it waits on the host (``optimizer_on_host``)."""
        states = self.all_model_state_bytes(n_layers, first, last)
        return states - self.optimizer_host_bytes(n_layers, first, last) if self.optimizer_on_host else states

    def optimizer_host_bytes(self, n_layers: int, first: bool = False, last: bool = False) -> float:
        """The optimizer state one rank holds (moments, and fp32 master weights under mixed
        precision: `OptimizerStates.state_bytes`), sharded where FSDP shards it: read only by the
        optimizer step, so it can wait for the step on the host."""
        return self._stage_params(n_layers, first, last) * self.optimizer.state_bytes / self.layout.fsdp

    @property
    def host_link(self) -> HostLink | None:
        return self.profile.host_link

    @property
    def offloads(self) -> bool:
        """Whether plans may offload: a host budget, and a link to price the copies on."""
        return self.host_budget > 0 and self.host_link is not None

    def with_host_tier(self, host_budget: float, layers: tuple[int, ...]) -> "CostModel":
        """This device, on stages of ``layers`` layers, with ``host_budget`` bytes of host memory
        behind it: the optimizer state waits on the host where the budget holds every stage's."""
        if host_budget <= 0 or self.host_link is None:
            return dataclasses.replace(self, host_budget=0.0, optimizer_on_host=False)
        last = len(layers) - 1
        fits = all(self.optimizer_host_bytes(n, s == 0, s == last) <= host_budget for s, n in enumerate(layers))
        return dataclasses.replace(self, host_budget=float(host_budget), optimizer_on_host=fits)

    def offloaded_bytes(self, shape: ChunkShape, n_layers: int, recompute: int, elementwise: int, offload: int,
                        first: bool = True) -> float:
        """Bytes the stage's last ``offload`` layers keep for a chunk's backward, which an offload
        moves to the host: a recomputed layer's input, an elementwise layer's reduced set, a stored
        layer's activations (never the K/V store, `layer_act_bytes` leaves its rows out). After the
        first stage (``first`` False) the stage's first layer keeps the tensor the stage received,
        which stays where autograd holds it: offloading every layer moves its input less."""
        kept = n_layers - offload
        whole = max(0, recompute - kept)
        elem = max(0, min(recompute + elementwise, n_layers) - max(recompute, kept))
        act = self.layer_act_bytes(shape)
        received = self.ckpt_layer_bytes(shape) if offload == n_layers and not first else 0.0
        return (offload * act - whole * (act - self.ckpt_layer_bytes(shape))
                - elem * self.elementwise_saved_bytes(shape) - received)

    def grad_bytes(self, n_layers: int, first: bool = False, last: bool = False) -> float:
        """The part of `model_state_bytes` a step allocates itself: its gradients (set to None
        between steps), whole where they accumulate before a once-per-step reduce-scatter, and
        on the last stage the loss's weight gradients waiting for a backward."""
        params = self._stage_params(n_layers, first, last)
        head = self._head_grad_bytes(last)
        if self.layout.fsdp > 1 and self.layout.reshard_per_chunk:
            return (params * self.optimizer.grad_bytes / self.layout.fsdp
                    + self.model.layer_params() * self.optimizer.grad_bytes + head)
        return params * self.optimizer.grad_bytes + head

    def _head_grad_bytes(self, last: bool) -> float:
        """The final norm's and LM head's weight gradients the loss forms in forward (whole, in the
        computing weights' dtype), held until a backward takes them: `model.loss.HeadGradients`."""
        return (self.model.vocab_size + 1) * self.model.hidden * self.optimizer.param_bytes if last else 0.0

    def check_range(self, shape: ChunkShape) -> None:
        """Warn when a chunk lies far outside the shapes the profile was fitted on."""
        hi = self.profile.fit_error.get("max_kv_len")
        if hi and shape.kv_len > 4 * hi:
            warnings.warn(
                f"chunk with {shape.kv_len} keys is far outside the profiled range (<= {hi}); "
                "the cost model extrapolates",
                stacklevel=2,
            )


def _profiles_dir():
    return resources.files("infinipipe") / "profiles"


def committed_profiles() -> list[str]:
    """Names of the profiles shipped with the package (``load_profile`` accepts them)."""
    return sorted(p.name[:-5] for p in _profiles_dir().iterdir() if p.name.endswith(".json"))


def load_profile(name_or_path: str | Path) -> Profile:
    """A committed profile by name (``"h100-bf16-llama-13b"``) or a profile JSON file by path."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        return Profile.load(path)
    entry = _profiles_dir() / f"{name_or_path}.json"
    if not entry.is_file():
        raise ValueError(f"no committed profile {str(name_or_path)!r}; known: {', '.join(committed_profiles())}")
    return Profile.from_json(json.loads(entry.read_text()))


DEFAULT_PROFILE_PREFIXES = ("h100-bf16", "cpu-fp32")


def default_profile_name(preset_name: str) -> str:
    """The committed profile for a model preset: the H100 one where it exists, else the CPU one."""
    shape = preset(preset_name).with_layers(1)
    for prefix in DEFAULT_PROFILE_PREFIXES:
        name = f"{prefix}-{preset_name}"
        if name in committed_profiles() and load_profile(name).model.with_layers(1) == shape:
            return name
    raise ValueError(f"no committed profile for preset {preset_name!r}; known: {', '.join(committed_profiles())}")


def default_profile(preset_name: str) -> Profile:
    return load_profile(default_profile_name(preset_name))
