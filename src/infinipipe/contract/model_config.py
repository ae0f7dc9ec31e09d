"""Model shapes: a LLaMA-style decoder described by a handful of integers."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention)."""

    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden", "layers", "heads", "kv_heads", "ffn"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"model.hidden ({self.hidden}) must be divisible by model.heads ({self.heads})")
        if self.heads % self.kv_heads:
            raise ValueError(f"model.heads ({self.heads}) must be divisible by model.kv_heads ({self.kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        attn = self.hidden * (self.hidden + 2 * self.kv_dim) + self.hidden * self.hidden
        if self.qkv_bias:
            attn += self.hidden + 2 * self.kv_dim
        mlp = 3 * self.hidden * self.ffn
        return attn + mlp + 2 * self.hidden

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden

    def head_params(self) -> int:
        """Final norm plus LM head (the head shares the embedding when tied)."""
        return self.hidden + (0 if self.tie_embeddings else self.vocab_size * self.hidden)

    def with_layers(self, layers: int) -> "ModelConfig":
        return ModelConfig(**{**asdict(self), "layers": layers})

    def cost_shape(self) -> "ModelConfig":
        """What a cost profile is matched on: one layer, with the fields that change no time or
        memory (RoPE base, norm epsilon) set to fixed values, so a profile serves every model
        that computes the same amount of work."""
        return ModelConfig(**{**asdict(self), "layers": 1, "rope_theta": 10000.0, "norm_eps": 1e-5})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**obj)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=512, hidden=64, layers=4, heads=4, kv_heads=2, ffn=176),
    "small": ModelConfig(vocab_size=8192, hidden=128, layers=8, heads=4, kv_heads=2, ffn=352),
    "llama-7b": ModelConfig(vocab_size=32000, hidden=4096, layers=32, heads=32, kv_heads=32, ffn=11008),
    "llama3-8b": ModelConfig(vocab_size=128256, hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336,
                             rope_theta=500000.0),
    "llama-13b": ModelConfig(vocab_size=32000, hidden=5120, layers=40, heads=40, kv_heads=40, ffn=13824),
    "llama-30b": ModelConfig(vocab_size=32000, hidden=6656, layers=60, heads=52, kv_heads=52, ffn=17920),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
