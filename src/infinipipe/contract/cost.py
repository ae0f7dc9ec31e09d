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

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .ir import check_format_version
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


@dataclass(frozen=True)
class Profile:
    """Fitted coefficients for one (device, dtype, model shape), with where they came from.

    Times are milliseconds, memory bytes. ``layer_*`` are per decoder layer; ``embed_*`` belong
    to the first stage and ``head_*`` (final norm, LM head, blocked loss) to the last.
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
    torch_version: str = ""
    source: str = ""
    derived_from: str | None = None
    fit_error: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PROFILE_FORMAT_VERSION,
            "device": self.device,
            "dtype": self.dtype,
            "torch": self.torch_version,
            "source": self.source,
            "derived_from": self.derived_from,
            "model": self.model.to_json(),
            "terms": {
                name: getattr(self, name).to_json()
                for name in ("layer_fwd", "layer_bwd", "layer_act_bytes", "head_fwd", "head_bwd",
                             "embed_fwd", "embed_bwd", "head_work_bytes")
            },
            "fit_error": self.fit_error,
        }

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


@dataclass(frozen=True)
class LinkModel:
    """Point-to-point link between neighbouring stages (default: one 200 Gb/s InfiniBand port)."""

    latency_s: float = 10e-6
    bandwidth_Bps: float = 25e9

    def __post_init__(self) -> None:
        if self.latency_s < 0:
            raise ValueError(f"link latency_s must be >= 0, got {self.latency_s}")
        if self.bandwidth_Bps <= 0:
            raise ValueError(f"link bandwidth_Bps must be > 0, got {self.bandwidth_Bps}")

    def transfer_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps


MIXED_PRECISION_ADAM = OptimizerStates(param_bytes=2, grad_bytes=2, state_bytes=12)


@dataclass(frozen=True)
class CostModel:
    """Time and memory of a chunk on a stage holding ``n`` layers, from a `Profile`.

    ``model`` may differ from the profile's only in its number of layers (layers are identical,
    so a profile of a few layers serves the whole model); any other difference is refused.
    """

    profile: Profile
    model: ModelConfig
    optimizer: OptimizerStates = OptimizerStates()

    def __post_init__(self) -> None:
        if self.model.cost_shape() != self.profile.model.cost_shape():
            raise ValueError(
                f"profile was made for model shape {self.profile.model.to_json()}, "
                f"not {self.model.to_json()}"
            )

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.profile.dtype]

    def _stage(self, layer: float, embed: float, head: float, n_layers: int, first: bool, last: bool) -> float:
        return n_layers * layer + (embed if first else 0.0) + (head if last else 0.0)

    def forward_ms(self, shape: ChunkShape, n_layers: int, first: bool = False, last: bool = False) -> float:
        p = self.profile
        return self._stage(p.layer_fwd(shape), p.embed_fwd(shape), p.head_fwd(shape), n_layers, first, last)

    def backward_ms(self, shape: ChunkShape, n_layers: int, first: bool = False, last: bool = False) -> float:
        """Backward alone, without recompute."""
        p = self.profile
        return self._stage(p.layer_bwd(shape), p.embed_bwd(shape), p.head_bwd(shape), n_layers, first, last)

    def recompute_ms(self, shape: ChunkShape, layers: int) -> float:
        """Recomputing ``layers`` checkpointed layers costs their forward once more."""
        return layers * self.profile.layer_fwd(shape)

    def layer_act_bytes(self, shape: ChunkShape) -> float:
        """Bytes one fully stored layer keeps for backward."""
        return self.profile.layer_act_bytes(shape)

    def ckpt_layer_bytes(self, shape: ChunkShape) -> float:
        """A checkpointed layer keeps only its input (hidden states)."""
        return shape.tokens * self.model.hidden * self.dtype_bytes

    def kv_bytes(self, shape: ChunkShape, n_layers: int) -> float:
        """K/V a split slice keeps on the stage for later slices (kept even on checkpointed layers)."""
        return 2 * shape.kept * self.model.kv_dim * self.dtype_bytes * n_layers

    def dkv_bytes(self, shape: ChunkShape, n_layers: int) -> float:
        """Gradients of that K/V, accumulated from later slices until the slice's own backward."""
        return self.kv_bytes(shape, n_layers)

    def activation_bytes(self, shape: ChunkShape, n_layers: int, recompute: int = 0,
                         first: bool = False, last: bool = False) -> float:
        """Everything a chunk keeps on a stage from its forward until its backward."""
        if not 0 <= recompute <= n_layers:
            raise ValueError(f"recompute {recompute} outside 0..{n_layers}")
        full = n_layers - recompute
        total = full * self.layer_act_bytes(shape) + recompute * self.ckpt_layer_bytes(shape)
        total += self.kv_bytes(shape, n_layers) + self.dkv_bytes(shape, n_layers)
        if first:
            total += shape.tokens * 8  # token ids kept by the embedding's backward
        if last:
            total += shape.tokens * self.model.hidden * self.dtype_bytes  # final-norm input
        return total

    def head_work_bytes(self, shape: ChunkShape) -> float:
        """Transient working memory of the blocked loss on the last stage.

        The profile's term is one full token block's logits and gradients; a chunk shorter than a
        block only ever forms its own tokens' logits.
        """
        return self.profile.head_work_bytes(shape) * min(1.0, shape.tokens / LOSS_BLOCK_TOKENS)

    def model_state_bytes(self, n_layers: int, first: bool = False, last: bool = False) -> float:
        params = n_layers * self.model.layer_params()
        if first:
            params += self.model.embedding_params()
        if last:
            params += self.model.head_params()
        return params * self.optimizer.per_param

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
