"""Point-to-point transfers between neighbouring stages, with buffers sized from the Plan.

Every rank of a pipeline holds the same Plan, so the shape of every transfer (a chunk's tokens x
hidden) is known before it happens: no shape is exchanged at run time. Each payload travels with a
five-integer header (plan digest, direction, chunk id, element count, dtype code) so a rank that
runs another plan, another model width or another dtype fails with a message naming the stage and
the chunk instead of reading garbage or hanging on a size mismatch.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..contract.ir import Plan
from .nccl_semantics import P2PGroup
from .p2p_order import Direction, Transfer

_DIRECTION_CODES = {"act": 1, "grad": 2}
_DTYPE_CODES = {torch.float32: 1, torch.float64: 2, torch.bfloat16: 3, torch.float16: 4}
_DTYPE_NAMES = {v: str(k).removeprefix("torch.") for k, v in _DTYPE_CODES.items()}
_HEADER = 5


def plan_digest(plan: Plan) -> int:
    """A 56-bit hash of everything the runtime executes (metadata excluded, it may differ)."""
    body = {k: v for k, v in plan.to_json().items() if k != "metadata"}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:7], "little")


class TransferMismatch(ValueError):
    """A received transfer is not the one the Plan says comes next."""


@dataclass
class _Recv:
    header: torch.Tensor
    payload: torch.Tensor
    batch: P2PGroup | None = None
    index: int = 0


@dataclass
class _Send:
    tensors: tuple[torch.Tensor, torch.Tensor]
    batch: P2PGroup | None = None
    index: int = 0

    def done(self) -> bool:
        return self.batch is not None and self.batch.done(self.index) and self.batch.done(self.index + 1)


@dataclass
class StageLink:
    """Sends to and receives from the neighbouring stages of one pipeline.

    A result waits in `send` until `post` issues the group that holds its transfer, with the
    receives around it in the stage's queue (`p2p_order` says which go together). ``emulate_nccl``
    makes gloo wait as NCCL does (`nccl_semantics`).
    """

    group: dist.ProcessGroup
    stage: int
    num_stages: int
    hidden: int
    dtype: torch.dtype
    device: torch.device
    digest: int
    emulate_nccl: bool = False
    _staged: dict = field(default_factory=dict)
    _recvs: dict = field(default_factory=dict)
    _sends: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} cannot be sent between stages; use one of {list(_DTYPE_CODES)}")

    def _peer(self, stage: int) -> int:
        return dist.get_global_rank(self.group, stage)

    def _source(self, direction: Direction) -> int:
        return self.stage - 1 if direction == "act" else self.stage + 1

    def send(self, direction: Direction, chunk_id: int, tensor: torch.Tensor) -> None:
        """Keep an activation (for the next stage) or a gradient (for the previous) until `post`
        reaches its transfer."""
        self._staged[direction, chunk_id] = tensor.detach().to(self.dtype).contiguous()

    def post(self, transfers: Sequence[Transfer], tokens: Sequence[int]) -> None:
        """Post ``transfers`` (this stage's sends and receives, in its queue's order: `p2p_order`)
        as one `batch_isend_irecv` group; ``tokens[c]`` is chunk ``c``'s rows on this rank."""
        queued = []
        for t in transfers:
            key = (t.direction, t.chunk_id)
            if t.src == self.stage:
                payload = self._staged.pop(key)
                header = torch.tensor([self.digest, _DIRECTION_CODES[t.direction], t.chunk_id, payload.numel(),
                                       _DTYPE_CODES[payload.dtype]], dtype=torch.long, device=self.device)
                snd = _Send((header, payload))
                self._sends.append(snd)
                what = f"send {t.direction} {t.chunk_id} to stage {t.dst}"
                queued += [(snd, what, dist.P2POp(dist.isend, header, self._peer(t.dst), self.group)),
                           (None, what, dist.P2POp(dist.isend, payload, self._peer(t.dst), self.group))]
            else:
                rec = _Recv(torch.empty(_HEADER, dtype=torch.long, device=self.device),
                            torch.empty(tokens[t.chunk_id], self.hidden, dtype=self.dtype, device=self.device))
                self._recvs[key] = rec
                what = f"recv {t.direction} {t.chunk_id} from stage {t.src}"
                queued += [(rec, what, dist.P2POp(dist.irecv, rec.header, self._peer(t.src), self.group)),
                           (None, what, dist.P2POp(dist.irecv, rec.payload, self._peer(t.src), self.group))]
        if not queued:
            return
        batch = P2PGroup([op for _, _, op in queued], [what for owner, what, _ in queued if owner is not None],
                         self.emulate_nccl)
        for i, (owner, _, _) in enumerate(queued):
            if owner is not None:
                owner.batch, owner.index = batch, i
        self._sends = [s for s in self._sends if not s.done()]

    def wait_recv(self, direction: Direction, chunk_id: int) -> torch.Tensor:
        """The received tensor, after checking its header against what the Plan expects."""
        rec = self._recvs.pop((direction, chunk_id), None)
        if rec is None:
            raise RuntimeError(f"stage {self.stage} waits for the {direction} of chunk {chunk_id} before posting "
                               "its receive")
        rec.batch.wait(rec.index)
        self._check(direction, chunk_id, rec)
        rec.batch.wait(rec.index + 1)
        return rec.payload

    def _check(self, direction: Direction, chunk_id: int, rec: _Recv) -> None:
        digest, kind, cid, numel, dtype = (int(x) for x in rec.header.tolist())
        src = self._source(direction)
        want = f"the {direction} of chunk {chunk_id} from stage {src}"
        if digest != self.digest:
            raise TransferMismatch(
                f"stage {self.stage}, chunk {chunk_id}: stage {src} runs a different plan "
                f"(digest {digest:#x}, this stage's {self.digest:#x})")
        if (kind, cid) != (_DIRECTION_CODES[direction], chunk_id):
            got = {v: k for k, v in _DIRECTION_CODES.items()}.get(kind, "?")
            raise TransferMismatch(
                f"stage {self.stage}, chunk {chunk_id}: expected {want}, received the {got} of chunk {cid}")
        if numel != rec.payload.numel() or dtype != _DTYPE_CODES[self.dtype]:
            tokens = rec.payload.shape[0]
            raise TransferMismatch(
                f"stage {self.stage}, chunk {chunk_id}: expected {want} as {tokens}x{self.hidden} "
                f"{_DTYPE_NAMES[_DTYPE_CODES[self.dtype]]} ({rec.payload.numel()} elements), received "
                f"{numel} elements of {_DTYPE_NAMES.get(dtype, f'dtype code {dtype}')}")

    def wait_sends(self) -> None:
        if self._staged:
            raise RuntimeError(f"stage {self.stage} never posted {sorted(self._staged)}")
        for s in self._sends:
            s.batch.wait(s.index)
            s.batch.wait(s.index + 1)
        self._sends = []
