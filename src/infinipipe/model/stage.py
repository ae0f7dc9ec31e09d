"""A pipeline stage of the decoder: a contiguous range of layers, plus embedding or head."""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..contract.cost import LOSS_BLOCK_TOKENS
from ..contract.model_config import ModelConfig
from .kv_store import LayerKV
from .layers import ChunkMeta, DecoderLayer, FusedLinear, HeadExchange, RMSNorm
from .loss import HeadGradients, blocked_cross_entropy


class StageModel(nn.Module):
    """Layers ``layer_ids`` of the model; the first stage embeds, the last normalises and predicts.

    Layers live in a ``ModuleDict`` keyed by their global index, so every stage's state dict uses
    the full model's parameter names (``layers.7.wqkv.weight``) and stages merge without renaming.
    """

    def __init__(self, cfg: ModelConfig, layer_ids: range, first: bool, last: bool, backend: str = "auto"):
        super().__init__()
        if layer_ids.start < 0 or layer_ids.stop > cfg.layers or len(layer_ids) < 1:
            raise ValueError(f"stage layers {layer_ids} outside the model's 0..{cfg.layers - 1}")
        if cfg.tie_embeddings and first != last:
            raise ValueError("tied embeddings need the embedding and the head on the same stage")
        self.cfg, self.layer_ids, self.first, self.last = cfg, layer_ids, first, last
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, backend) for i in layer_ids})
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden) if first else None
        if last:
            self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
            self.head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
            if cfg.tie_embeddings:
                self.head.weight = self.embed.weight
        else:
            self.norm = self.head = None

    def forward(self, x: torch.Tensor, meta: ChunkMeta, stores: Sequence[LayerKV | None] | None = None,
                shard: HeadExchange | None = None, recompute_layers: int = 0, labels: torch.Tensor | None = None,
                normaliser: int = 1, loss_block_tokens: int = LOSS_BLOCK_TOKENS,
                elementwise_layers: int = 0, offload_layers: int = 0,
                offload_hooks: AbstractContextManager | None = None,
                head_grads: HeadGradients | None = None) -> torch.Tensor:
        """One chunk through the stage: token ids in on the first stage, hidden states otherwise; the
        chunk's loss (its token losses over ``normaliser``) out of the last stage, hidden states otherwise.

        The first ``recompute_layers`` layers are checkpointed and the next ``elementwise_layers``
        recompute only their elementwise parts (`DecoderLayer`): backward reaches them after the
        stored layers have freed their activations. The last ``offload_layers`` layers, whatever
        their mode, run inside ``offload_hooks`` (saved-tensor hooks that move what they save to
        the host; a recomputed layer's checkpoint saves its input under them). The loss forms its
        weights' gradients in forward and adds them to ``head_grads`` (`blocked_cross_entropy`):
        a stage running many chunks passes one for all of them. The whole chunk is
        one call of the module, so wrappers that hook ``forward`` (FSDP) see one forward per chunk.
        """
        h = self.embed_tokens(x) if self.first else x
        n = len(self.layer_ids)
        stores = [None] * n if stores is None else stores
        for j, (layer, store) in enumerate(zip(self.ordered_layers(), stores)):
            with offload_hooks if offload_hooks is not None and j >= n - offload_layers else nullcontext():
                if j < recompute_layers:
                    h = checkpoint(layer, h, meta, store, shard, use_reentrant=False)
                else:
                    h = layer(h, meta, store, shard, j < recompute_layers + elementwise_layers)
        meta.forget_rope()
        if not self.last:
            return h
        return blocked_cross_entropy(h, self.norm, self.head, labels, normaliser, loss_block_tokens, head_grads)

    def ordered_layers(self) -> list[DecoderLayer]:
        return [self.layers[str(i)] for i in self.layer_ids]

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids are checked against the vocabulary where the batch reaches the stage
        (`Batch.check_token_ids`), not here: a check on the device would wait for it every chunk."""
        return self.embed(token_ids)


def _draw(name: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.randn(shape, generator=gen, dtype=torch.float64).mul_(std)


def init_weights(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Deterministic init keyed by parameter name, so a stage gets the same weights as the whole model.

    A fused projection's weight is its parts' weights stacked, each drawn under the part's own name
    (``layers.3.wk.weight``): the same weights as the separate projections had."""
    fused = {f"{path}.{leaf}": module.parts for path, module in model.named_modules()
             if isinstance(module, FusedLinear) for leaf, _ in module.named_parameters(recurse=False)}
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name in fused:
                parent, _, leaf = name.rpartition(".")
                parent = parent.rpartition(".")[0]
                p.copy_(torch.cat([_draw(f"{parent}.{part}.{leaf}".lstrip("."), (rows, *p.shape[1:]), seed, std)
                                   for part, rows in fused[name].items()]).to(p.dtype))
            else:
                p.copy_(_draw(name, tuple(p.shape), seed, std).to(p.dtype))
