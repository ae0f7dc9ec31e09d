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
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

from ..contract.ir import Plan
from .nccl_semantics import P2PGroup

Direction = Literal["act", "grad"]
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

    Operations are queued and issued together by `flush` (one `batch_isend_irecv`), so a stage's
    send of a result and its receive for a later action go out as one group, as NCCL needs.
    ``emulate_nccl`` makes a group complete as a whole (`nccl_semantics`).
    """

    group: dist.ProcessGroup
    stage: int
    num_stages: int
    hidden: int
    dtype: torch.dtype
    device: torch.device
    digest: int
    emulate_nccl: bool = False
    _queued: list = field(default_factory=list)
    _recvs: dict = field(default_factory=dict)
    _sends: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} cannot be sent between stages; use one of {list(_DTYPE_CODES)}")

    def _peer(self, stage: int) -> int:
        return dist.get_global_rank(self.group, stage)

    def _source(self, direction: Direction) -> int:
        return self.stage - 1 if direction == "act" else self.stage + 1

    def post_recv(self, direction: Direction, chunk_id: int, tokens: int) -> None:
        """Queue the receive of ``chunk_id``'s activation (from the previous stage) or gradient."""
        key = (direction, chunk_id)
        if key in self._recvs:
            return
        src = self._source(direction)
        if not 0 <= src < self.num_stages:
            raise ValueError(f"stage {self.stage} has no neighbour to receive a {direction} from")
        rec = _Recv(torch.empty(_HEADER, dtype=torch.long, device=self.device),
                    torch.empty(tokens, self.hidden, dtype=self.dtype, device=self.device))
        self._recvs[key] = rec
        peer = self._peer(src)
        what = f"recv {direction} {chunk_id} from stage {src}"
        self._queued.append((rec, what, dist.P2POp(dist.irecv, rec.header, peer, self.group)))
        self._queued.append((None, what, dist.P2POp(dist.irecv, rec.payload, peer, self.group)))

    def send(self, direction: Direction, chunk_id: int, tensor: torch.Tensor) -> None:
        """Queue the send of an activation (to the next stage) or a gradient (to the previous)."""
        dst = self.stage + 1 if direction == "act" else self.stage - 1
        payload = tensor.detach().to(self.dtype).contiguous()
        header = torch.tensor([self.digest, _DIRECTION_CODES[direction], chunk_id, payload.numel(),
                               _DTYPE_CODES[payload.dtype]], dtype=torch.long, device=self.device)
        snd = _Send((header, payload))
        self._sends.append(snd)
        peer = self._peer(dst)
        what = f"send {direction} {chunk_id} to stage {dst}"
        self._queued.append((snd, what, dist.P2POp(dist.isend, header, peer, self.group)))
        self._queued.append((None, what, dist.P2POp(dist.isend, payload, peer, self.group)))

    def flush(self) -> None:
        """Issue everything queued as one batch."""
        if not self._queued:
            return
        works = dist.batch_isend_irecv([op for _, _, op in self._queued])
        batch = P2PGroup(works, [what for owner, what, _ in self._queued if owner is not None], self.emulate_nccl)
        for i, (owner, _, _) in enumerate(self._queued):
            if owner is not None:
                owner.batch, owner.index = batch, i
        self._queued = []
        self._sends = [s for s in self._sends if not s.done()]

    def wait_recv(self, direction: Direction, chunk_id: int, tokens: int) -> torch.Tensor:
        """The received tensor, after checking its header against what the Plan expects."""
        if (direction, chunk_id) not in self._recvs:
            self.post_recv(direction, chunk_id, tokens)
        self.flush()
        rec = self._recvs.pop((direction, chunk_id))
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
        self.flush()
        for s in self._sends:
            s.batch.wait(s.index)
            s.batch.wait(s.index + 1)
        self._sends = []
