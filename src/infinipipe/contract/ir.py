"""The plan IR: the one contract between planning and execution.

A `Plan` is a plain, immutable, JSON-serialisable value. Planners emit it, the simulator costs
it, the runtime executes it; `validate_plan` rejects anything the runtime could not run exactly
or could deadlock on.
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Segment:
    """Tokens ``[start, end)`` of sequence ``seq_id``; ``start > 0`` attends to a cached prefix."""

    seq_id: int
    start: int
    end: int

    def __post_init__(self) -> None:
        if self.seq_id < 0:
            raise ValueError(f"segment {self}: seq_id must be >= 0")
        if self.start < 0:
            raise ValueError(f"segment {self}: start must be >= 0")
        if self.end <= self.start:
            raise ValueError(f"segment {self}: empty segment (end must be > start)")

    @property
    def length(self) -> int:
        return self.end - self.start

    def to_json(self) -> list[int]:
        return [self.seq_id, self.start, self.end]

    @classmethod
    def from_json(cls, obj: Sequence[int]) -> "Segment":
        seq_id, start, end = obj
        return cls(int(seq_id), int(start), int(end))


@dataclass(frozen=True)
class Chunk:
    """The unit a pipeline moves: whole short sequences plus at most one prefixed slice."""

    id: int
    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", tuple(self.segments))
        if not self.segments:
            raise ValueError(f"chunk {self.id}: has no segments")
        prefixed = [s for s in self.segments if s.start > 0]
        if len(prefixed) > 1:
            raise ValueError(
                f"chunk {self.id}: {len(prefixed)} segments with a cached prefix "
                f"({prefixed}); at most one split/tail slice per chunk"
            )
        seen = set()
        for s in self.segments:
            if s.seq_id in seen:
                raise ValueError(f"chunk {self.id}: sequence {s.seq_id} appears twice")
            seen.add(s.seq_id)

    @property
    def tokens(self) -> int:
        return sum(s.length for s in self.segments)

    @property
    def seg_lens(self) -> tuple[int, ...]:
        return tuple(s.length for s in self.segments)

    @property
    def prefixed_segment(self) -> Segment | None:
        """The segment that attends to cached K/V of its sequence (a later slice), if any."""
        return next((s for s in self.segments if s.start > 0), None)

    def kept_segment(self, seq_lengths: Sequence[int]) -> Segment | None:
        """The segment whose K/V later slices of its sequence need (a non-last slice), if any."""
        return next((s for s in self.segments if s.end < seq_lengths[s.seq_id]), None)

    def partial_segment(self, seq_lengths: Sequence[int]) -> Segment | None:
        """The slice of a split sequence in this chunk (prefixed, kept or both), if any."""
        return next((s for s in self.segments if s.length < seq_lengths[s.seq_id]), None)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "segments": [s.to_json() for s in self.segments]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Chunk":
        return cls(int(obj["id"]), tuple(Segment.from_json(s) for s in obj["segments"]))


def gradient_store_spans(chunks: Iterable[Chunk], seq_lengths: Sequence[int]) -> list[tuple[int, int]]:
    """``(first, last)`` chunk ids of each split sequence: its K/V store's dK/dV lives on a stage
    from the start of the backward of the chunk holding its last slice (``last``, the first of
    its slices to run backward) to the end of the backward of the chunk holding its first slice."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for c in chunks:
        for s in c.segments:
            if s.length < seq_lengths[s.seq_id]:
                if s.start == 0:
                    first[s.seq_id] = c.id
                if s.end == seq_lengths[s.seq_id]:
                    last[s.seq_id] = c.id
    return [(first[q], last[q]) for q in sorted(first) if q in last]


def check_coverage(chunks: Iterable[Chunk], lengths: Sequence[int]) -> None:
    """Raise ``ValueError`` unless every token of every sequence is in exactly one segment.

    Also rejects a chunk holding two partial sequences (a slice of a split sequence beside
    another slice): that would keep two long sequences in flight at once.
    """
    pieces: dict[int, list[Segment]] = defaultdict(list)
    for c in chunks:
        partial = []
        for s in c.segments:
            if s.seq_id >= len(lengths):
                raise ValueError(
                    f"chunk {c.id}: sequence {s.seq_id} is not in the batch ({len(lengths)} sequences)"
                )
            if s.end > lengths[s.seq_id]:
                raise ValueError(
                    f"chunk {c.id}: segment {s} runs past the end of sequence {s.seq_id} "
                    f"(length {lengths[s.seq_id]})"
                )
            if s.length < lengths[s.seq_id]:
                partial.append(s)
            pieces[s.seq_id].append(s)
        if len(partial) > 1:
            raise ValueError(f"chunk {c.id}: holds slices of {len(partial)} split sequences {partial}")
    for seq_id, length in enumerate(lengths):
        segs = sorted(pieces.get(seq_id, []), key=lambda s: s.start)
        pos = 0
        for s in segs:
            if s.start < pos:
                raise ValueError(f"sequence {seq_id}: segments overlap at token {s.start} ({segs})")
            if s.start > pos:
                raise ValueError(f"sequence {seq_id}: tokens [{pos}, {s.start}) are in no chunk")
            pos = s.end
        if pos != length:
            raise ValueError(f"sequence {seq_id}: tokens [{pos}, {length}) are in no chunk")


ActionKind = Literal["F", "B", "W"]


@dataclass(frozen=True)
class Action:
    """Forward or backward of one chunk on one stage, recomputing ``recompute_layers`` layers
    whole and the elementwise parts of the next ``elementwise_layers`` (the stage's other layers
    keep everything their backward needs); or ``W``, the weight gradients of the chunk's layers,
    which its backward on that stage then leaves for later (`deferred_chunks`): the backward sends
    the input gradient upstream sooner, and the W runs where the stage would otherwise wait.

    ``offload_layers``: the saved tensors of the stage's last ``offload_layers`` layers (what each
    keeps in its mode: a recomputed layer's checkpointed input, an elementwise layer's reduced
    set, a stored layer's activations) wait for the backward in host memory: copied out once the
    forward ends, copied back from the start of the action ``reload_lead`` places before the
    backward (a backward's field; a forward's is 0). F and B of a chunk carry the same count.
    The K/V store of a split sequence never moves (every later slice's forward reads it).
    """

    kind: ActionKind
    chunk_id: int
    recompute_layers: int = 0
    elementwise_layers: int = 0
    offload_layers: int = 0
    reload_lead: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("F", "B", "W"):
            raise ValueError(f"action kind must be 'F', 'B' or 'W', got {self.kind!r}")
        if self.kind == "W" and self.mode != (0, 0, 0):
            raise ValueError(f"action {self}: a W action recomputes and offloads nothing (its backward does)")
        if self.recompute_layers < 0 or self.elementwise_layers < 0 or self.offload_layers < 0:
            raise ValueError(f"action {self}: recompute_layers, elementwise_layers and offload_layers must be >= 0")
        if self.kind == "F" and self.reload_lead:
            raise ValueError(f"action {self}: only a backward has a reload_lead")
        if self.kind == "B" and (self.reload_lead >= 1) != (self.offload_layers > 0):
            raise ValueError(f"action {self}: a backward with offloaded layers needs reload_lead >= 1 (and only then)")

    @property
    def mode(self) -> tuple[int, int, int]:
        """What F and B of a chunk on a stage must agree on: recomputed, elementwise, offloaded layers."""
        return self.recompute_layers, self.elementwise_layers, self.offload_layers

    def with_mode(self, recompute: int, elementwise: int = 0, offload: int = 0, reload_lead: int = 0) -> "Action":
        """This action recomputing, running elementwise and offloading so many layers (a backward
        copying back ``reload_lead`` actions ahead); a W stays as it is (its backward carries them)."""
        if self.kind == "W":
            return self
        return Action(self.kind, self.chunk_id, recompute, elementwise, offload, reload_lead if self.kind == "B" else 0)

    def to_json(self) -> list:
        """``[kind, chunk, recompute]``, then the elementwise count where it or an offload is not
        zero, then ``offload, reload_lead`` where layers are offloaded: plans that use neither read
        and write as before they existed."""
        head = [self.kind, self.chunk_id, self.recompute_layers]
        if self.offload_layers:
            return head + [self.elementwise_layers, self.offload_layers, self.reload_lead]
        return head + [self.elementwise_layers] if self.elementwise_layers else head

    @classmethod
    def from_json(cls, obj: Sequence) -> "Action":
        if len(obj) not in (3, 4, 6):
            raise ValueError(f"action {list(obj)!r}: expected [kind, chunk, recompute(, elementwise(, offload, reload_lead))]")
        kind, chunk_id, rec, *more = obj
        ints = [int(x) for x in more] + [0] * (3 - len(more))
        return cls(str(kind), int(chunk_id), int(rec), *ints)  # type: ignore[arg-type]


PLAN_FORMAT_VERSION = 1


def check_format_version(obj: Mapping[str, Any], supported: int, what: str) -> None:
    """Refuse a serialised plan or profile written in a format this build cannot read."""
    if obj.get("version") != supported:
        raise ValueError(f"{what} format version {obj.get('version')!r} is not supported "
                         f"(this build reads version {supported})")


@dataclass(frozen=True)
class Plan:
    """Chunks, per-stage ordered actions and the layer split: everything the runtime needs.

    ``pipelines`` lists the chunk ids of each back-to-back 1F1B pipeline (gradients accumulate
    across them); ``metadata`` carries the planner's name, estimates and solver status.
    """

    seq_lengths: tuple[int, ...]
    chunks: tuple[Chunk, ...]
    stage_actions: tuple[tuple[Action, ...], ...]
    layers_per_stage: tuple[int, ...]
    pipelines: tuple[tuple[int, ...], ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "seq_lengths", tuple(int(x) for x in self.seq_lengths))
        object.__setattr__(self, "chunks", tuple(self.chunks))
        object.__setattr__(self, "stage_actions", tuple(tuple(a) for a in self.stage_actions))
        object.__setattr__(self, "layers_per_stage", tuple(int(x) for x in self.layers_per_stage))
        if not self.pipelines:
            object.__setattr__(self, "pipelines", (tuple(c.id for c in self.chunks),))
        else:
            object.__setattr__(self, "pipelines", tuple(tuple(p) for p in self.pipelines))

    @property
    def num_stages(self) -> int:
        return len(self.stage_actions)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLAN_FORMAT_VERSION,
            "seq_lengths": list(self.seq_lengths),
            "chunks": [c.to_json() for c in self.chunks],
            "stage_actions": [[a.to_json() for a in s] for s in self.stage_actions],
            "layers_per_stage": list(self.layers_per_stage),
            "pipelines": [list(p) for p in self.pipelines],
            "metadata": self.metadata,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Plan":
        check_format_version(obj, PLAN_FORMAT_VERSION, "plan")
        return cls(
            seq_lengths=tuple(obj["seq_lengths"]),
            chunks=tuple(Chunk.from_json(c) for c in obj["chunks"]),
            stage_actions=tuple(tuple(Action.from_json(a) for a in s) for s in obj["stage_actions"]),
            layers_per_stage=tuple(obj["layers_per_stage"]),
            pipelines=tuple(tuple(p) for p in obj["pipelines"]),
            metadata=dict(obj.get("metadata", {})),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json())

    @classmethod
    def loads(cls, text: str) -> "Plan":
        return cls.from_json(json.loads(text))


def validate_plan(plan: Plan) -> list[tuple[int, Action]]:
    """Raise ``ValueError`` naming the first violated rule (DESIGN invariants 1 and 2); return the
    plan's `play_order`, which the check computes anyway."""
    for i, c in enumerate(plan.chunks):
        if c.id != i:
            raise ValueError(f"chunk ids must be 0..n-1 in order; position {i} holds chunk {c.id}")
    check_coverage(plan.chunks, plan.seq_lengths)
    if len(plan.layers_per_stage) != plan.num_stages:
        raise ValueError(
            f"layers_per_stage has {len(plan.layers_per_stage)} entries for {plan.num_stages} stages"
        )
    if any(n < 1 for n in plan.layers_per_stage):
        raise ValueError(f"every stage needs at least one layer: {plan.layers_per_stage}")
    in_pipes = sorted(cid for p in plan.pipelines for cid in p)
    if in_pipes != list(range(len(plan.chunks))):
        raise ValueError("pipelines must list every chunk id exactly once")
    n = len(plan.chunks)
    f_orders, b_orders = [], []
    for s, actions in enumerate(plan.stage_actions):
        f_pos: dict[int, int] = {}
        b_pos: dict[int, int] = {}
        w_pos: dict[int, int] = {}
        rec: dict[int, tuple[int, int, int]] = {}
        for i, a in enumerate(actions):
            if not 0 <= a.chunk_id < n:
                raise ValueError(f"stage {s}: action {a} names an unknown chunk")
            if a.recompute_layers + a.elementwise_layers > plan.layers_per_stage[s]:
                raise ValueError(
                    f"stage {s}: chunk {a.chunk_id} recomputes {a.recompute_layers} layers "
                    f"(and {a.elementwise_layers} elementwise), the stage has {plan.layers_per_stage[s]}"
                )
            if a.offload_layers > plan.layers_per_stage[s]:
                raise ValueError(f"stage {s}: chunk {a.chunk_id} offloads {a.offload_layers} layers, "
                                 f"the stage has {plan.layers_per_stage[s]}")
            if a.kind == "W":
                if a.chunk_id in w_pos:
                    raise ValueError(f"stage {s}: W of chunk {a.chunk_id} appears twice")
                if a.chunk_id not in b_pos:
                    raise ValueError(f"stage {s}: W of chunk {a.chunk_id} precedes its backward")
                w_pos[a.chunk_id] = i
                continue
            table = f_pos if a.kind == "F" else b_pos
            if a.chunk_id in table:
                raise ValueError(f"stage {s}: {a.kind} of chunk {a.chunk_id} appears twice")
            table[a.chunk_id] = i
            if rec.setdefault(a.chunk_id, a.mode) != a.mode:
                raise ValueError(f"stage {s}: chunk {a.chunk_id} has F and B with different recompute or offload")
        for cid in range(n):
            if cid not in f_pos or cid not in b_pos:
                raise ValueError(f"stage {s}: chunk {cid} lacks a forward or a backward")
            if b_pos[cid] < f_pos[cid]:
                raise ValueError(f"stage {s}: backward of chunk {cid} precedes its forward")
            lead = actions[b_pos[cid]].reload_lead
            if lead and b_pos[cid] - lead <= f_pos[cid]:
                raise ValueError(f"stage {s}: chunk {cid}'s reload would start {lead} actions before its backward, "
                                 "at or before its forward")
        f_orders.append(sorted(f_pos, key=f_pos.get))
        b_orders.append(sorted(b_pos, key=b_pos.get))
        _check_slice_order(plan, s, f_orders[-1], b_orders[-1])
    for s in range(1, plan.num_stages):
        if f_orders[s] != f_orders[0]:
            raise ValueError(f"stage {s} runs forwards in another order than stage 0")
        if b_orders[s] != b_orders[0]:
            raise ValueError(f"stage {s} runs backwards in another order than stage 0")
    return play_order(plan)


def _check_slice_order(plan: Plan, stage: int, f_order: list[int], b_order: list[int]) -> None:
    """Slices of a sequence: forward in order, backward in reverse order."""
    starts: dict[int, dict[int, int]] = defaultdict(dict)
    for c in plan.chunks:
        for seg in c.segments:
            starts[seg.seq_id][c.id] = seg.start
    for seq_id, by_chunk in starts.items():
        if len(by_chunk) < 2:
            continue
        fwd = [by_chunk[c] for c in f_order if c in by_chunk]
        bwd = [by_chunk[c] for c in b_order if c in by_chunk]
        if fwd != sorted(fwd):
            raise ValueError(f"stage {stage}: slices of sequence {seq_id} run forward out of order")
        if bwd != sorted(bwd, reverse=True):
            raise ValueError(
                f"stage {stage}: slices of sequence {seq_id} must run backward in reverse order"
            )


def deferred_chunks(actions: Sequence[Action]) -> set[int]:
    """Chunks whose backward on a stage with these actions leaves its weight gradients to a W."""
    return {a.chunk_id for a in actions if a.kind == "W"}


def upstream_stage(kind: ActionKind, stage: int, num_stages: int) -> int | None:
    """The neighbour whose output an action consumes: a forward takes the previous stage's
    activations, a backward the next stage's gradient, a W nothing; ``None`` at the pipeline's
    ends."""
    if kind == "W":
        return None
    if kind == "F":
        return stage - 1 if stage > 0 else None
    return stage + 1 if stage < num_stages - 1 else None


def downstream_stage(kind: ActionKind, stage: int, num_stages: int) -> int | None:
    """The neighbour that consumes an action's output (the inverse of `upstream_stage`)."""
    if kind == "W":
        return None
    return upstream_stage("B" if kind == "F" else "F", stage, num_stages)


def play_order(plan: Plan) -> list[tuple[int, Action]]:
    """Every (stage, action) in an order that keeps each stage's own order and runs an action only
    after the neighbour stage produced its input: how the plan plays with non-blocking sends.

    Raises ``ValueError`` if some stage would wait forever (a deadlock)."""
    done: set[tuple[str, int, int]] = set()
    ptr = [0] * plan.num_stages
    order: list[tuple[int, Action]] = []
    progressed = True
    while progressed:
        progressed = False
        for s, actions in enumerate(plan.stage_actions):
            while ptr[s] < len(actions):
                a = actions[ptr[s]]
                src = upstream_stage(a.kind, s, plan.num_stages)
                if src is not None and (a.kind, src, a.chunk_id) not in done:
                    break
                done.add((a.kind, s, a.chunk_id))
                order.append((s, a))
                ptr[s] += 1
                progressed = True
    if len(order) != sum(len(a) for a in plan.stage_actions):
        stuck = [(s, plan.stage_actions[s][ptr[s]]) for s in range(plan.num_stages)
                 if ptr[s] < len(plan.stage_actions[s])]
        raise ValueError(f"plan deadlocks: stages wait forever at {stuck}")
    return order
