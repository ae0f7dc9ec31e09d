import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infinipipe.contract.ir import check_coverage
from infinipipe.planners.processor import SliceTimer, equal_time_cuts, process_sequences
from test_simulator import h100_like_cost

COST = h100_like_cost()
TIMER = SliceTimer(COST)
BIG = 10**9


def slice_times(cuts):
    return [TIMER.slice_ms(a, b - a) for a, b in zip([0] + cuts[:-1], cuts)]


def test_slice_timer_reproduces_the_cost_model():
    from infinipipe.contract.shapes import ChunkShape

    for prefix, length in [(0, 1), (0, 4096), (12345, 777), (100000, 30000)]:
        want = COST.forward_ms(ChunkShape((length,), prefix=prefix), n_layers=1)
        assert TIMER.slice_ms(prefix, length) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("length,k", [(131072, 8), (65536, 3), (262144, 16), (5000, 2)])
def test_longest_sequence_splits_into_equal_time_slices_with_later_ones_shorter(length, k):
    cuts = equal_time_cuts(length, k, TIMER)
    assert len(cuts) == k and cuts[-1] == length
    sizes = [b - a for a, b in zip([0] + cuts[:-1], cuts)]
    assert sizes == sorted(sizes, reverse=True)
    times = slice_times(cuts)
    one_token = TIMER.slice_ms(length, 1) - TIMER.chunk
    assert max(times) - min(times) <= 2 * one_token + 1e-9


@pytest.mark.parametrize("sp", [2, 8])
def test_equal_time_slices_on_a_sequence_parallel_layout(sp):
    """Ulysses SP divides a stage's heads and tokens and adds all-to-alls: the profile's own
    coefficients then overstate a slice's time eightfold, and slices cut by them alone came out
    a quarter as long as they should (a 98K sequence's two slices took 0.06 s and 0.43 s)."""
    import dataclasses

    from infinipipe.contract.layout import StageLayout

    cost = dataclasses.replace(COST, layout=StageLayout(sp=sp, fsdp=sp))
    timer = SliceTimer(cost)
    for length, k in ((98304, 2), (131072, 5)):
        cuts = equal_time_cuts(length, k, timer)
        times = [timer.slice_ms(a, b - a) for a, b in zip([0] + cuts[:-1], cuts)]
        one_token = max(timer.slice_ms(a, b - a + 1) - timer.slice_ms(a, b - a) for a, b in zip([0] + cuts[:-1], cuts))
        assert len(cuts) == k and max(times) - min(times) <= 2 * one_token


@pytest.mark.parametrize("length,k", [(8192, 4), (20000, 7), (3000, 2)])
def test_equal_time_slices_with_a_profile_nonlinear_in_attention_area(length, k):
    from infinipipe.contract.cost import CostModel, load_profile

    profile = load_profile("cpu-fp32-tiny")
    timer = SliceTimer(CostModel(profile, profile.model))
    assert not timer.linear
    cuts = equal_time_cuts(length, k, timer)
    sizes = [b - a for a, b in zip([0] + cuts[:-1], cuts)]
    assert len(cuts) == k and sizes == sorted(sizes, reverse=True)
    times = [timer.slice_ms(a, b - a) for a, b in zip([0] + cuts[:-1], cuts)]
    one_token = max(timer.slice_ms(a, b - a + 1) - timer.slice_ms(a, b - a) for a, b in zip([0] + cuts[:-1], cuts))
    assert max(times) - min(times) <= 2 * one_token


def test_other_long_sequences_are_cut_at_the_same_points():
    lengths = [100000, 70000, 300]
    chunks = process_sequences(lengths, COST, 4, BIG)
    cuts = equal_time_cuts(100000, 4, TIMER)
    starts = sorted(s.start for c in chunks for s in c.segments if s.seq_id == 1)
    assert starts == [0] + [p for p in cuts if p < 70000]


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 256 * 1024), min_size=1, max_size=40), k=st.integers(1, 16))
def test_chunks_cover_every_token_once_and_never_hold_two_split_sequences(lengths, k):
    chunks = process_sequences(lengths, COST, k, BIG)
    assert [c.id for c in chunks] == list(range(len(chunks)))
    check_coverage(chunks, lengths)
    for c in chunks:
        partial = [s for s in c.segments if s.length < lengths[s.seq_id]]
        assert len(partial) <= 1
        if any(s.end < lengths[s.seq_id] for s in partial):
            assert len(c.segments) == 1, "a non-tail slice travels alone"


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 64 * 1024), min_size=1, max_size=40), k=st.integers(1, 8),
       cap=st.integers(1024, 64 * 1024))
def test_no_chunk_exceeds_the_token_threshold(lengths, k, cap):
    chunks = process_sequences(lengths, COST, k, cap)  # over-long slices are cut further, never refused
    limit = min(cap, equal_time_cuts(max(lengths), k, TIMER)[0])
    assert all(c.tokens <= limit for c in chunks)


def test_short_sequences_fill_buckets_within_the_time_and_token_thresholds():
    from infinipipe.contract.shapes import ChunkShape

    lengths = [8192] + [1024] * 20
    chunks = process_sequences(lengths, COST, 1, BIG)
    slice_ms = TIMER.slice_ms(0, 8192)
    assert all(COST.forward_ms(ChunkShape.of(c, lengths), 1) <= slice_ms * (1 + 1e-9) for c in chunks)
    assert all(c.tokens <= 8192 for c in chunks)
    assert len(chunks) == 1 + 3


def test_tail_slices_seed_hybrid_chunks_and_packing_never_passes_the_slice_time():
    from infinipipe.contract.shapes import ChunkShape

    lengths = [65536, 40000] + [512] * 64
    chunks = process_sequences(lengths, COST, 4, BIG)
    cuts = equal_time_cuts(65536, 4, TIMER)
    limit = max(TIMER.slice_ms(a, b - a) for a, b in zip([0] + cuts[:-1], cuts))
    tail = next(c for c in chunks if any(s.seq_id == 1 and s.end == 40000 for s in c.segments))
    assert len(tail.segments) > 1, "the shorter sequence's tail slice is a hybrid chunk"
    assert all(c.tokens <= cuts[0] for c in chunks)
    for c in chunks:
        if len(c.segments) > 1:
            assert COST.forward_ms(ChunkShape.of(c, lengths), 1) <= limit * (1 + 1e-9)


@pytest.mark.parametrize("k", [1, 2, 8])
def test_slices_never_exceed_the_token_capacity_and_later_ones_stay_shorter(k):
    lengths = [100000, 40000, 700, 300]
    chunks = process_sequences(lengths, COST, k, 1000)
    check_coverage(chunks, lengths)
    assert all(c.tokens <= 1000 for c in chunks)
    first = sorted((s for c in chunks for s in c.segments if s.seq_id == 0), key=lambda s: s.start)
    assert len(first) >= 100 and first[-1].length <= first[0].length


def test_one_slice_keeps_every_sequence_whole():
    lengths = [3000, 2000, 1000, 900, 50]
    chunks = process_sequences(lengths, COST, 1, BIG)
    assert all(s.start == 0 and s.end == lengths[s.seq_id] for c in chunks for s in c.segments)
    assert all(c.tokens <= 3000 for c in chunks)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lengths=[], num_slices=1, token_capacity=10), "no sequences"),
    (dict(lengths=[5, 0], num_slices=1, token_capacity=10), "at least one token"),
    (dict(lengths=[5], num_slices=0, token_capacity=10), "num_slices"),
    (dict(lengths=[5], num_slices=1, token_capacity=0), "token_capacity"),
])
def test_bad_input_is_refused_with_a_clear_message(kwargs, match):
    with pytest.raises(ValueError, match=match):
        process_sequences(cost=COST, **kwargs)
