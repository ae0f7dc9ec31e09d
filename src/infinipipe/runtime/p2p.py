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
class _Op:
    """A posted send or receive: its header row and payload, and the group that carries them."""

    header: torch.Tensor
    payload: torch.Tensor
    batch: P2PGroup
    index: int
    seq: int

    def wait(self) -> None:
        self.batch.wait(self.index)
        self.batch.wait(self.index + 1)


@dataclass
class StageLink:
    """Sends to and receives from the neighbouring stages of one pipeline.

    ``posts`` are the stage's groups in posting order (`p2p_order.stage_posts`); ``tokens[c]`` is
    chunk ``c``'s rows on this rank. A result waits in `send` until `post_next` issues the group
    that holds its transfer. Every header is known from the Plan, so all of them are built in one
    tensor when the link is made: no per-transfer host-to-device copy inside the step, and no
    allocation whose lifetime depends on timing. A sent payload is released when a receive posted
    in the same or a later group has completed; under NCCL's rules (groups complete whole and in
    posting order) the send is then done, so what a stage holds at any action is fixed by the Plan,
    not by how fast a peer was. ``emulate_nccl`` makes gloo wait as NCCL does (`nccl_semantics`).
    """

    group: dist.ProcessGroup
    stage: int
    num_stages: int
    hidden: int
    dtype: torch.dtype
    device: torch.device
    digest: int
    posts: Sequence[Sequence[Transfer]]
    tokens: Sequence[int]
    emulate_nccl: bool = False
    _staged: dict = field(default_factory=dict)
    _recvs: dict = field(default_factory=dict)
    _sends: list = field(default_factory=list)
    _next: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} cannot be sent between stages; use one of {list(_DTYPE_CODES)}")
        queue = [t for group in self.posts for t in group]
        self._row = {(t.direction, t.chunk_id): i for i, t in enumerate(queue)}
        rows = [[self.digest, _DIRECTION_CODES[t.direction], t.chunk_id, self._numel(t.chunk_id),
                 _DTYPE_CODES[self.dtype]] if t.src == self.stage else [0] * _HEADER for t in queue]
        self._headers = torch.tensor(rows, dtype=torch.long).reshape(len(queue), _HEADER).to(self.device)

    def _numel(self, chunk_id: int) -> int:
        return self.tokens[chunk_id] * self.hidden

    def _peer(self, stage: int) -> int:
        return dist.get_global_rank(self.group, stage)

    def _source(self, direction: Direction) -> int:
        return self.stage - 1 if direction == "act" else self.stage + 1

    def send(self, direction: Direction, chunk_id: int, tensor: torch.Tensor) -> None:
        """Keep an activation (for the next stage) or a gradient (for the previous) until
        `post_next` reaches its transfer."""
        if tensor.numel() != self._numel(chunk_id):
            raise RuntimeError(f"stage {self.stage}, chunk {chunk_id}: the {direction} to send has "
                               f"{tensor.numel()} elements, the Plan says {self.tokens[chunk_id]}x{self.hidden}")
        self._staged[direction, chunk_id] = tensor.detach().to(self.dtype).contiguous()

    def post_next(self) -> None:
        """Post the next of ``posts`` (this stage's sends and receives, in its queue's order) as one
        `batch_isend_irecv` group."""
        seq, self._next = self._next, self._next + 1
        queued = []
        for t in self.posts[seq]:
            key = (t.direction, t.chunk_id)
            header = self._headers[self._row[key]]
            if t.src == self.stage:
                payload = self._staged.pop(key)
                what, peer, op = f"send {t.direction} {t.chunk_id} to stage {t.dst}", t.dst, dist.isend
            else:
                payload = torch.empty(self.tokens[t.chunk_id], self.hidden, dtype=self.dtype, device=self.device)
                what, peer, op = f"recv {t.direction} {t.chunk_id} from stage {t.src}", t.src, dist.irecv
            queued.append((key, t.src == self.stage, what, header, payload,
                           [dist.P2POp(op, header, self._peer(peer), self.group),
                            dist.P2POp(op, payload, self._peer(peer), self.group)]))
        if not queued:
            return
        batch = P2PGroup([op for *_, ops in queued for op in ops], [what for _, _, what, *_ in queued],
                         self.emulate_nccl)
        for i, (key, sending, _, header, payload, _) in enumerate(queued):
            posted = _Op(header, payload, batch, 2 * i, seq)
            if sending:
                self._sends.append(posted)
            else:
                self._recvs[key] = posted

    def wait_recv(self, direction: Direction, chunk_id: int) -> torch.Tensor:
        """The received tensor, after checking its header against what the Plan expects."""
        rec = self._recvs.pop((direction, chunk_id), None)
        if rec is None:
            raise RuntimeError(f"stage {self.stage} waits for the {direction} of chunk {chunk_id} before posting "
                               "its receive")
        rec.batch.wait(rec.index)
        self._check(direction, chunk_id, rec)
        rec.batch.wait(rec.index + 1)
        self._release(rec.seq)
        return rec.payload

    def _release(self, seq: int) -> None:
        """Drop the sends of groups up to ``seq``: done under NCCL once a receive of group ``seq``
        is (a wait that returns at once); on gloo, waited for, which cannot hang since both ends
        of every transfer before that receive in the stage's queue are posted."""
        for s in self._sends:
            if s.seq <= seq:
                s.wait()
        self._sends = [s for s in self._sends if s.seq > seq]

    def _check(self, direction: Direction, chunk_id: int, rec: _Op) -> None:
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
        """At the step's end: every group posted, every send done."""
        if self._staged or self._next != len(self.posts):
            raise RuntimeError(f"stage {self.stage} never posted {sorted(self._staged)} "
                               f"(groups posted: {self._next} of {len(self.posts)})")
        self._release(self._next)
