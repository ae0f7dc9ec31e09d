"""Plans export to torch.distributed.pipelining's action notation, and torch's own tools read them."""
from __future__ import annotations

import csv
import random

from torch.distributed.pipelining.schedules import (
    _Action,
    _add_send_recv,
    _ComputationType,
    _simulate_comms_compute,
    _validate_schedule,
)

from chunking import random_chunks, with_weight_actions
from infinipipe.planners.schedule import epp_schedule
from infinipipe.runtime.interop import pipeline_order_table, pipelining_actions, write_pipelining_csv


def _plan(stages=3):
    lengths = [30, 7, 12, 3, 19]
    chunks = random_chunks(lengths, random.Random(5))
    return epp_schedule(chunks, lengths, stages, [1] * stages)


def test_csv_export_is_read_back_by_torch_parser_action_for_action(tmp_path):
    plan = _plan()
    path = tmp_path / "plan.csv"
    write_pipelining_csv(plan, path)
    with open(path, newline="") as f:
        order = {rank: [_Action.from_str(s) for s in row] for rank, row in enumerate(csv.reader(f))}
    for stage, actions in enumerate(plan.stage_actions):
        kinds = {"F": _ComputationType.FORWARD, "B": _ComputationType.FULL_BACKWARD}
        assert order[stage] == [_Action(stage, kinds[a.kind], a.chunk_id) for a in actions]
    mapping = _validate_schedule(order, plan.num_stages, plan.num_stages, len(plan.chunks))
    assert mapping == {s: s for s in range(plan.num_stages)}


def test_exported_schedule_lowers_to_deadlock_free_communication_in_torch():
    plan = _plan(4)
    order = {r: [_Action.from_str(s) for s in row] for r, row in pipelining_actions(plan).items()}
    with_comms = _add_send_recv(order, stage_to_rank=lambda s: s, num_stages=plan.num_stages)
    _simulate_comms_compute(with_comms, stage_to_rank=lambda s: s, num_stages=plan.num_stages)


def test_deferred_weight_gradients_export_as_torchs_input_and_weight_backwards():
    plan = with_weight_actions(_plan(4), random.Random(2))
    order = {r: [_Action.from_str(s) for s in row] for r, row in pipelining_actions(plan).items()}
    for stage, actions in enumerate(plan.stage_actions):
        deferred = {a.chunk_id for a in actions if a.kind == "W"}
        kinds = [a.computation_type for a in order[stage]]
        assert kinds.count(_ComputationType.BACKWARD_WEIGHT) == len(deferred) > 0
        assert kinds.count(_ComputationType.BACKWARD_INPUT) == len(deferred)
    with_comms = _add_send_recv(order, stage_to_rank=lambda s: s, num_stages=plan.num_stages)
    _simulate_comms_compute(with_comms, stage_to_rank=lambda s: s, num_stages=plan.num_stages)


def test_order_table_lists_every_action_under_its_rank():
    plan = _plan()
    table = pipeline_order_table(plan)
    assert table.splitlines()[0].split() == [f"{w}" for r in range(3) for w in ("Rank", str(r))]
    assert sum(line.count("F") for line in table.splitlines()[1:]) == plan.num_stages * len(plan.chunks)
