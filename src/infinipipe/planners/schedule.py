"""EPP 1F1B schedule: per-stage F/B order for one or more back-to-back 1F1B pipelines.

Inside a pipeline, sequences with more chunks go first (a short one first would stall the
steady phase while a long one is half in flight), whole chunks follow them or (interleaved) fill
the gaps between split sequences so their K/V stores are not in flight together, a sequence's
slices run forward in order and backward in reverse, and stage ``p`` (0-indexed) warms up with
``d - 1 - p + N_split`` forwards so the last slice of the longest sequence can turn round on the
last stage. A timed order (`Order`, `timed_order`) replaces the fixed warm-up with a list schedule
on the cost model. Every stage runs the same forward order and the same backward order, so sends
and receives pair up.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..contract.ir import Action, Chunk, Plan, validate_plan
from ..contract.shapes import ChunkShape
from .timed_order import light_ahead, list_schedule

if TYPE_CHECKING:
    from ..contract.cost import CostModel
    from ..contract.layout import LinkModel


@dataclass(frozen=True)
class Order:
    """How a pipeline's chunks are ordered: ``1f1b`` (split sequences first, then whole chunks,
    a fixed warm-up), ``interleaved`` (whole chunks between split sequences, `pipeline_orders`)
    or ``timed`` (`timed_order`: the ``lead`` lightest whole chunks first, each stage's
    interleaving from a list schedule with ``slack`` more chunks in flight than 1F1B's warm-up;
    with ``defer``, backwards leave their layers' weight gradients to W actions, at most
    ``defer`` pending on a stage when it starts a forward or backward)."""

    kind: Literal["1f1b", "interleaved", "timed"] = "1f1b"
    lead: int = 0
    slack: int = 0
    defer: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("1f1b", "interleaved", "timed"):
            raise ValueError(f"order kind must be 1f1b, interleaved or timed, got {self.kind!r}")
        if min(self.lead, self.slack, self.defer) < 0 or (self.kind != "timed" and (self.lead or self.slack or self.defer)):
            raise ValueError(f"order {self}: lead, slack and defer are >= 0 and only for a timed order")

    @property
    def label(self) -> str:
        if self.kind == "timed":
            return f"timed lead={self.lead} slack={self.slack}" + (f" defer={self.defer}" if self.defer else "")
        return self.kind

    @property
    def shares_diagonals(self) -> bool:
        """Whether stage ``s``'s k-th backward runs beside stage ``s + i``'s (k + i)-th, so their
        recompute can share one ILP variable (`ilp_problem.diagonal_variables`); a timed order
        interleaves each stage its own way."""
        return self.kind != "timed"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any] | None) -> "Order":
        return cls(**obj) if obj else cls()


def plan_order(plan: Plan) -> Order:
    """The order a plan's metadata records (1F1B where none is recorded)."""
    return Order.from_json(plan.metadata.get("order"))


def _owner(chunk: Chunk, seq_lengths: Sequence[int]) -> int | None:
    """The split sequence a chunk carries a slice of, if any."""
    for s in chunk.segments:
        if s.length < seq_lengths[s.seq_id]:
            return s.seq_id
    return None


def split_gap(num_stages: int, n_split: int) -> int:
    """Whole chunks between two split sequences that keep the second one's slices out of flight
    on every stage until the first one's backward is done: the first stage's warm-up less one."""
    return max(num_stages - 2 + n_split, 0)


def fill_gaps(split: Sequence[list[int]], whole: Sequence[list[int]], gap: int) -> list[list[int]]:
    """``split`` in order with up to ``gap`` of ``whole`` after each but the last, from the first
    gap on; the rest of ``whole`` after the last."""
    out: list[list[int]] = []
    taken = 0
    for i, item in enumerate(split):
        out.append(item)
        if i < len(split) - 1:
            out += whole[taken:taken + gap]
            taken = min(taken + gap, len(whole))
    return out + list(whole[taken:])


def pipeline_orders(chunks: Sequence[Chunk], seq_lengths: Sequence[int], ids: Sequence[int],
                    num_stages: int = 1, interleave: bool = False) -> tuple[list[int], list[int], int]:
    """Forward order, backward order and N_split of one pipeline holding chunks ``ids``.

    Split sequences go first, most slices first, back to back, then the whole chunks. With
    ``interleave``, whole chunks fill the gaps between split sequences instead, `split_gap` each
    from the first gap on (the rest follow the last one): a split sequence's backward then
    overlaps forwards of whole chunks, not the next split sequence's slices, so the largest K/V
    stores are in flight one at a time as far as the batch has short work for it (the short work
    then waits in the long sequences' window: which is faster depends on the batch).
    """
    by_seq: dict[int, list[Chunk]] = defaultdict(list)
    whole: list[int] = []
    for cid in ids:
        owner = _owner(chunks[cid], seq_lengths)
        if owner is None:
            whole.append(cid)
        else:
            by_seq[owner].append(chunks[cid])
    groups = [[c.id for c in sorted(cs, key=lambda c: next(s.start for s in c.segments if s.seq_id == seq))]
              for seq, cs in by_seq.items()]
    groups.sort(key=lambda g: (-len(g), g[0]))
    n_split = max((len(g) for g in groups), default=1)
    gap = split_gap(num_stages, n_split) if interleave else 0
    blocks = fill_gaps(groups, [[cid] for cid in whole], gap)
    forward = [cid for b in blocks for cid in b]
    backward = [cid for b in blocks for cid in reversed(b)]
    return forward, backward, n_split


def one_f_one_b(forward: Sequence[int], backward: Sequence[int], warmup: int) -> list[tuple[str, int]]:
    """``warmup`` forwards, then alternate backward/forward, then the remaining backwards."""
    warmup = min(warmup, len(forward))
    out = [("F", c) for c in forward[:warmup]]
    fi, bi = warmup, 0
    while bi < len(backward):
        out.append(("B", backward[bi]))
        bi += 1
        if fi < len(forward):
            out.append(("F", forward[fi]))
            fi += 1
    return out


def timed_actions(chunks: Sequence[Chunk], seq_lengths: Sequence[int], ids: Sequence[int],
                  layers_per_stage: Sequence[int], order: Order, cost: "CostModel",
                  link: "LinkModel | None" = None) -> tuple[list[list[tuple[str, int]]], list[int]]:
    """Each stage's (kind, chunk) actions of one pipeline in a timed order, and its forward order:
    durations without recompute from ``cost``, hops on ``link`` (default: the layout's)."""
    num_stages = len(layers_per_stage)
    last = num_stages - 1
    forward, backward, n_split = pipeline_orders(chunks, seq_lengths, ids, num_stages)
    shapes = {c: ChunkShape.of(chunks[c], seq_lengths) for c in ids}
    whole = [c for c in ids if _owner(chunks[c], seq_lengths) is None]
    forward, backward = light_ahead(forward, backward, whole, order.lead,
                                    lambda c: cost.forward_ms(shapes[c], layers_per_stage[0], True, last == 0)
                                    + cost.backward_ms(shapes[c], layers_per_stage[0], True, last == 0))
    hops = cost.layout.hop_links(num_stages) if link is None else (link,) * last
    sent = {c: cost.boundary_bytes(sh) for c, sh in shapes.items()}

    def duration(s: int, kind: str, c: int) -> float:
        return cost.action_ms(kind, shapes[c], layers_per_stage[s], s == 0, s == last) / 1e3

    def weights(s: int, c: int) -> float:
        return cost.weight_grad_ms(shapes[c], layers_per_stage[s]) / 1e3

    caps = [num_stages - 1 - s + n_split + min(order.lead, len(whole)) + order.slack for s in range(num_stages)]
    return list_schedule(forward, backward, num_stages, duration, lambda hop, c: hops[hop].transfer_s(sent[c]),
                         caps, order.defer, weights), forward


def epp_schedule(
    chunks: Sequence[Chunk],
    seq_lengths: Sequence[int],
    num_stages: int,
    layers_per_stage: Sequence[int],
    pipelines: Sequence[Sequence[int]] | None = None,
    recompute: Callable[[int, int], int] | None = None,
    metadata: dict[str, Any] | None = None,
    validate: bool = True,
    order: Order | None = None,
    cost: "CostModel | None" = None,
    link: "LinkModel | None" = None,
) -> Plan:
    """A validated `Plan`; ``pipelines`` groups chunk ids into back-to-back 1F1B pipelines.

    ``recompute(stage, chunk_id)`` gives the layers that chunk recomputes on that stage (0 if
    omitted). A sequence's chunks must all sit in one pipeline (its K/V lives there).
    ``validate=False`` skips `validate_plan` for plans built only to be costed (a planner's
    throw-away candidates); a plan handed to the runtime must be validated. ``order`` (default
    1F1B) of kind ``interleaved`` puts whole chunks between split sequences (`pipeline_orders`);
    a ``timed`` one needs ``cost`` (and takes ``link``, as the simulator does). The order is
    recorded in the metadata where it is not 1F1B.
    """
    order = order or Order()
    if order.kind == "timed" and cost is None:
        raise ValueError("a timed order needs the cost model its list schedule runs on")
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if len(layers_per_stage) != num_stages:
        raise ValueError(f"layers_per_stage has {len(layers_per_stage)} entries for {num_stages} stages")
    chunks = list(chunks)
    if not chunks:
        raise ValueError("chunks: nothing to schedule")
    groups = [list(range(len(chunks)))] if pipelines is None else [list(p) for p in pipelines]
    if any(not g for g in groups):
        raise ValueError("pipelines: every pipeline needs at least one chunk")
    home: dict[int, int] = {}
    for gi, g in enumerate(groups):
        for cid in g:
            if not 0 <= cid < len(chunks):
                raise ValueError(f"pipelines: chunk id {cid} is not one of 0..{len(chunks) - 1}")
            for s in chunks[cid].segments:
                if home.setdefault(s.seq_id, gi) != gi:
                    raise ValueError(
                        f"pipelines: sequence {s.seq_id} has chunks in pipelines {home[s.seq_id]} and {gi}; "
                        "a sequence's slices must share one pipeline"
                    )
    stage_ops: list[list[Action]] = [[] for _ in range(num_stages)]
    ordered_pipes = []
    shared: dict[tuple[str, int], Action] = {}  # without recompute, every stage's actions are alike
    for g in groups:
        if order.kind == "timed":
            per_stage, forward = timed_actions(chunks, seq_lengths, g, layers_per_stage, order, cost, link)
        else:
            forward, backward, n_split = pipeline_orders(chunks, seq_lengths, g, num_stages,
                                                         order.kind == "interleaved")
            per_stage = [one_f_one_b(forward, backward, num_stages - 1 - p + n_split) for p in range(num_stages)]
        ordered_pipes.append(tuple(forward))
        for p in range(num_stages):
            for kind, cid in per_stage[p]:
                if recompute and kind != "W":
                    stage_ops[p].append(Action(kind, cid, int(recompute(p, cid))))
                else:
                    if (kind, cid) not in shared:
                        shared[(kind, cid)] = Action(kind, cid)
                    stage_ops[p].append(shared[(kind, cid)])
    plan = Plan(
        seq_lengths=tuple(seq_lengths),
        chunks=tuple(chunks),
        stage_actions=tuple(tuple(ops) for ops in stage_ops),
        layers_per_stage=tuple(layers_per_stage),
        pipelines=tuple(ordered_pipes),
        metadata={**(metadata or {}), **({"order": order.to_json()} if order.kind != "1f1b" else {})},
    )
    if validate:
        validate_plan(plan)
    return plan
