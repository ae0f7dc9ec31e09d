import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infinipipe.contract.ir import Chunk, Segment, validate_plan
from infinipipe.planners.processor import process_sequences
from infinipipe.planners.schedule import Order, epp_schedule, split_gap
from test_simulator import h100_like_cost

COST = h100_like_cost()


def layers_for(stages, total=32):
    out = [total // stages] * stages
    out[-1] += total - sum(out)
    return out


def order(plan, stage, kind):
    return [a.chunk_id for a in plan.stage_actions[stage] if a.kind == kind]


def pipelines_by_sequence(chunks, groups: int) -> list[list[int]]:
    """Chunk ids in up to ``groups`` pipelines, every chunk of a sequence in one of them."""
    home: dict[int, int] = {}
    pipes: list[list[int]] = [[] for _ in range(groups)]
    for c in chunks:
        g = home.setdefault(c.segments[0].seq_id, c.segments[0].seq_id % groups)
        for s in c.segments:
            home.setdefault(s.seq_id, g)
        pipes[g].append(c.id)
    return [p for p in pipes if p]


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 256 * 1024), min_size=1, max_size=30), k=st.integers(1, 12),
       stages=st.integers(1, 16), groups=st.integers(1, 3))
def test_schedules_of_processed_batches_pass_the_validator(lengths, k, stages, groups):
    chunks = process_sequences(lengths, COST, k, 10**9)
    pipes = pipelines_by_sequence(chunks, groups)
    plan = epp_schedule(chunks, lengths, stages, layers_for(stages), pipelines=pipes)
    validate_plan(plan)
    assert len(plan.pipelines) == len(pipes)


def split_batch():
    # sequence 0 in 3 slices (tail packed with seq 2), sequence 1 in 2 slices, seq 3 alone
    chunks = [
        Chunk(0, (Segment(1, 0, 500),)),
        Chunk(1, (Segment(0, 0, 600),)),
        Chunk(2, (Segment(0, 600, 1000),)),
        Chunk(3, (Segment(1, 500, 800),)),
        Chunk(4, (Segment(0, 1000, 1200), Segment(2, 0, 100))),
        Chunk(5, (Segment(3, 0, 400),)),
    ]
    return chunks, [1200, 800, 100, 400]


def test_longer_sequences_first_slices_forward_in_order_backward_in_reverse():
    """Interleaved, whole chunk 5 sits between the two split sequences: it fills the first one's backward."""
    chunks, lengths = split_batch()
    plan = epp_schedule(chunks, lengths, 3, [10, 11, 11])
    interleaved = epp_schedule(chunks, lengths, 3, [10, 11, 11], order=Order("interleaved"))
    for p in range(3):
        assert order(plan, p, "F") == [1, 2, 4, 0, 3, 5]
        assert order(plan, p, "B") == [4, 2, 1, 3, 0, 5]
        assert order(interleaved, p, "F") == [1, 2, 4, 5, 0, 3]
        assert order(interleaved, p, "B") == [4, 2, 1, 5, 3, 0]


@pytest.mark.parametrize("stages, whole", [(2, 40), (4, 40), (8, 40), (4, 3)])
def test_whole_chunks_keep_split_sequences_out_of_flight_together_where_there_are_enough(stages, whole):
    """Per stage, a split sequence's first forward waits for the previous one's last backward
    where `split_gap` whole chunks stand between them: the first gaps are filled first."""
    slices = [4, 4, 3]
    chunks, lengths = [], []
    for seq, k in enumerate(slices):
        lengths.append(1000 * k)
        for j in range(k):
            chunks.append(Chunk(len(chunks), (Segment(seq, 1000 * j, 1000 * (j + 1)),)))
    for _ in range(whole):
        lengths.append(500)
        chunks.append(Chunk(len(chunks), (Segment(len(lengths) - 1, 0, 500),)))
    plan = epp_schedule(chunks, lengths, stages, layers_for(stages), order=Order("interleaved"))
    first = {seq: next(c.id for c in chunks if c.segments[0] == Segment(seq, 0, 1000)) for seq in range(3)}
    gap = split_gap(stages, max(slices))
    forward = order(plan, 0, "F")
    gaps = [forward.index(first[1]) - 4, forward.index(first[2]) - forward.index(first[1]) - 4]
    assert gaps == [min(gap, whole), min(gap, whole - min(gap, whole))]
    for p in range(stages):
        ops = [(a.kind, a.chunk_id) for a in plan.stage_actions[p]]
        for (a, b), filled in zip(((0, 1), (1, 2)), gaps):
            assert (ops.index(("B", first[a])) < ops.index(("F", first[b]))) == (filled >= split_gap(stages - p, 4))


@pytest.mark.parametrize("stages", [1, 2, 3, 5])
def test_warm_up_is_stages_minus_one_minus_p_plus_n_split(stages):
    chunks, lengths = split_batch()
    plan = epp_schedule(chunks, lengths, stages, layers_for(stages))
    for p in range(stages):
        kinds = [a.kind for a in plan.stage_actions[p]]
        assert kinds.index("B") == min(len(chunks), stages - 1 - p + 3)


def test_equal_whole_chunks_give_classic_1f1b():
    chunks = [Chunk(i, (Segment(i, 0, 10),)) for i in range(4)]
    plan = epp_schedule(chunks, [10] * 4, 2, [16, 16])
    as_text = [" ".join(f"{a.kind}{a.chunk_id}" for a in ops) for ops in plan.stage_actions]
    assert as_text == ["F0 F1 B0 F2 B1 F3 B2 B3", "F0 B0 F1 B1 F2 B2 F3 B3"]


def test_pipelines_run_back_to_back_each_with_its_own_warm_up():
    chunks, lengths = split_batch()
    plan = epp_schedule(chunks, lengths, 2, [16, 16], pipelines=[[0, 3, 5], [1, 2, 4]])
    assert plan.pipelines == ((0, 3, 5), (1, 2, 4))
    ops = [f"{a.kind}{a.chunk_id}" for a in plan.stage_actions[1]]
    assert ops == ["F0", "F3", "B3", "F5", "B0", "B5", "F1", "F2", "F4", "B4", "B2", "B1"]


def test_recompute_callback_sets_both_actions_of_a_chunk():
    chunks, lengths = split_batch()
    plan = epp_schedule(chunks, lengths, 2, [16, 16], recompute=lambda s, c: s + c)
    for s in range(2):
        for a in plan.stage_actions[s]:
            assert a.recompute_layers == s + a.chunk_id


def test_a_sequence_split_across_pipelines_is_refused():
    chunks, lengths = split_batch()
    with pytest.raises(ValueError, match="sequence 0"):
        epp_schedule(chunks, lengths, 2, [16, 16], pipelines=[[0, 1, 3, 5], [2, 4]])


def test_bad_arguments_are_refused():
    chunks, lengths = split_batch()
    with pytest.raises(ValueError, match="layers_per_stage"):
        epp_schedule(chunks, lengths, 2, [32])
    with pytest.raises(ValueError, match="chunk id 9"):
        epp_schedule(chunks, lengths, 2, [16, 16], pipelines=[[0, 1, 2, 3, 4, 5, 9]])


def test_offloaded_actions_round_trip_and_plans_without_offload_write_as_before():
    from infinipipe.contract.ir import Action, Plan
    assert Action("F", 3, 1).to_json() == ["F", 3, 1]
    assert Action("B", 3, 1, 2).to_json() == ["B", 3, 1, 2]
    offloaded = Action("B", 3, 1, 0, 2, 3)
    assert offloaded.to_json() == ["B", 3, 1, 0, 2, 3]
    assert Action.from_json(offloaded.to_json()) == offloaded
    with pytest.raises(ValueError, match="reload_lead"):
        Action("B", 3, 0, 0, 2, 0)
    with pytest.raises(ValueError, match="only a backward"):
        Action("F", 3, 0, 0, 2, 1)
    plan = epp_schedule([Chunk(i, (Segment(i, 0, 10),)) for i in range(4)], [10] * 4, 2, [16, 16])
    ops = [list(a) for a in plan.stage_actions]
    ops[0] = [Action(a.kind, a.chunk_id, 0, 0, 2, 2 if a.kind == "B" else 0) if a.chunk_id == 0 else a for a in ops[0]]
    with pytest.raises(ValueError, match="at or before its forward"):  # F0 F1 B0: B0's reload two back is F0
        validate_plan(Plan(plan.seq_lengths, plan.chunks, ops, plan.layers_per_stage, plan.pipelines))
    ops[0] = [Action(a.kind, a.chunk_id, 0, 0, 2, 1 if a.kind == "B" else 0) if a.chunk_id == 0 else a for a in ops[0]]
    validate_plan(Plan(plan.seq_lengths, plan.chunks, ops, plan.layers_per_stage, plan.pipelines))
    ops[0] = [Action(a.kind, a.chunk_id, 0, 0, 1 if a.kind == "B" else 2, 1 if a.kind == "B" else 0)
              if a.chunk_id == 0 else a for a in ops[0]]
    with pytest.raises(ValueError, match="different recompute or offload"):
        validate_plan(Plan(plan.seq_lengths, plan.chunks, ops, plan.layers_per_stage, plan.pipelines))
