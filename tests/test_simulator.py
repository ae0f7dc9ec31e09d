import dataclasses
import json

import pytest

from infinipipe.contract.cost import CostModel, LinearTerm, Profile
from infinipipe.contract.ir import Action, Chunk, Plan, Segment, validate_plan
from infinipipe.contract.layout import StageLayout
from infinipipe.contract.model_config import PRESETS
from infinipipe.contract.shapes import ChunkShape
from infinipipe.planners.schedule import epp_schedule
from infinipipe.sim.simulator import LinkModel, iteration_time, simulate

NO_LINK = LinkModel(latency_s=0.0, bandwidth_Bps=1e30)


def h100_like_cost(preset: str = "llama-7b", head: bool = True) -> CostModel:
    """A real Profile with explicit coefficients of the order an H100 measures for a 7B layer in
    bf16 (about 4e-8 ms per attention pair, 0.75 us per token forward, backward about 2.5x)."""
    model = PRESETS[preset]
    extra = {}
    if head:
        extra = dict(head_fwd=LinearTerm({"tokens": 4e-4}), head_bwd=LinearTerm({"tokens": 8e-4}),
                     embed_fwd=LinearTerm({"tokens": 1e-6}), embed_bwd=LinearTerm({"tokens": 2e-6}),
                     head_work_bytes=LinearTerm({"chunk": 2.6e8}))
    profile = Profile(
        model=model.with_layers(1), device="explicit test coefficients", dtype="bfloat16",
        layer_fwd=LinearTerm({"attn": 4e-8, "tokens": 7.5e-4, "chunk": 0.05}),
        layer_bwd=LinearTerm({"attn": 1e-7, "tokens": 1.5e-3, "chunk": 0.1}),
        layer_act_bytes=LinearTerm({"tokens": 153738.0}),
        **extra,
    )
    return CostModel(profile, model)


def equal_chunks_plan(m: int, stages: int, tokens: int, cost: CostModel) -> Plan:
    chunks = [Chunk(i, (Segment(i, 0, tokens),)) for i in range(m)]
    layers = [cost.model.layers // stages] * stages
    layers[-1] += cost.model.layers - sum(layers)
    return epp_schedule(chunks, [tokens] * m, stages, layers, metadata={"planner": "test"})


@pytest.mark.parametrize("m,stages", [(1, 1), (4, 4), (8, 4), (3, 8), (16, 2)])
def test_matches_hand_computed_1f1b_timeline_on_equal_chunks(m, stages):
    cost = h100_like_cost(head=False)
    plan = equal_chunks_plan(m, stages, 4096, cost)
    shape = ChunkShape((4096,))
    n = cost.model.layers // stages
    f = cost.forward_ms(shape, n) / 1e3
    b = cost.backward_ms(shape, n) / 1e3
    result = simulate(plan, cost, link=NO_LINK)
    assert result.iteration_time_s == pytest.approx((m + stages - 1) * (f + b), rel=1e-9)
    assert result.busy_s == pytest.approx([m * (f + b)] * stages)
    assert result.bubble_ratio == pytest.approx((stages - 1) / (m + stages - 1), rel=1e-9)


def test_iteration_time_alone_is_the_simulations():
    cost = h100_like_cost()
    plan = epp_schedule([Chunk(0, (Segment(0, 0, 6000),)), Chunk(1, (Segment(0, 6000, 9000), Segment(1, 0, 2000))),
                         Chunk(2, (Segment(2, 0, 5000),))], [9000, 2000, 5000], 4, [8] * 4,
                        recompute=lambda s, c: (s + c) % 3)
    for link in (NO_LINK, LinkModel()):
        assert iteration_time(plan, cost, link) == simulate(plan, cost, link=link).iteration_time_s


def test_link_latency_and_bandwidth_delay_every_hop():
    cost = h100_like_cost(head=False)
    plan = equal_chunks_plan(1, 4, 4096, cost)
    link = LinkModel(latency_s=1e-3, bandwidth_Bps=1e9)
    hop = 1e-3 + 4096 * cost.model.hidden * 2 / 1e9
    base = simulate(plan, cost, link=NO_LINK).iteration_time_s
    assert simulate(plan, cost, link=link).iteration_time_s == pytest.approx(base + 2 * 3 * hop)


def test_each_hop_runs_at_the_link_the_layout_places_it_on():
    """Two GPUs a node, one per stage: hops 0 and 2 stay inside a node, hop 1 crosses; one chunk
    crosses each hop twice (forward, backward)."""
    intra, inter = LinkModel(1e-4, 1e9), LinkModel(1e-3, 1e8)
    cost = h100_like_cost(head=False)
    cost = dataclasses.replace(cost, layout=StageLayout(gpus_per_node=2, intra_node=intra, inter_node=inter))
    plan = equal_chunks_plan(1, 4, 4096, cost)
    sent = 4096 * cost.model.hidden * 2
    base = simulate(plan, cost, link=NO_LINK).iteration_time_s
    expected = base + 2 * (2 * intra.transfer_s(sent) + inter.transfer_s(sent))
    assert simulate(plan, cost).iteration_time_s == pytest.approx(expected)
    assert iteration_time(plan, cost) == simulate(plan, cost).iteration_time_s


def test_peak_memory_is_model_states_plus_chunks_in_flight():
    cost = h100_like_cost(head=False)
    m, stages = 6, 4
    plan = equal_chunks_plan(m, stages, 2048, cost)
    result = simulate(plan, cost, link=NO_LINK)
    shape = ChunkShape((2048,))
    n = cost.model.layers // stages
    for p in range(stages):
        in_flight = min(m, stages - p)
        first, last = p == 0, p == stages - 1
        act = cost.activation_bytes(shape, n, 0, first, last)
        # The peak is the first backward: every chunk in flight, plus that backward's work memory.
        backward = cost.chunk_memory(shape, n, first, last).during_backward(0)
        expect = cost.model_state_bytes(n, first, last) + (in_flight - 1) * act + backward
        assert result.peak_memory_bytes[p] == pytest.approx(expect)


def test_recompute_costs_forward_time_and_saves_memory():
    cost = h100_like_cost()
    chunks = [Chunk(i, (Segment(i, 0, 8192),)) for i in range(4)]
    layers = [8, 8, 8, 8]
    plain = epp_schedule(chunks, [8192] * 4, 4, layers)
    ckpt = epp_schedule(chunks, [8192] * 4, 4, layers, recompute=lambda s, c: 3)
    a, b = simulate(plain, cost), simulate(ckpt, cost)
    assert a.recompute_time_s == 0
    assert b.recompute_time_s == pytest.approx(16 * cost.recompute_ms(ChunkShape((8192,)), 3) / 1e3)
    assert b.iteration_time_s > a.iteration_time_s
    assert all(x < y for x, y in zip(b.peak_memory_bytes, a.peak_memory_bytes))


def test_elementwise_recompute_costs_its_own_time_and_saves_its_bytes_between_store_and_recompute():
    base = h100_like_cost()
    profile = dataclasses.replace(base.profile, layer_elementwise_bytes=LinearTerm({"tokens": 38400.0}),
                                  layer_elementwise_ms=LinearTerm({"tokens": 3e-5}))
    cost = CostModel(profile, base.model)
    chunks = [Chunk(i, (Segment(i, 0, 8192),)) for i in range(4)]
    layers = [8, 8, 8, 8]
    plain = epp_schedule(chunks, [8192] * 4, 4, layers)
    elem = dataclasses.replace(plain, stage_actions=tuple(
        tuple(Action(a.kind, a.chunk_id, 1, 5) for a in acts) for acts in plain.stage_actions))
    whole = epp_schedule(chunks, [8192] * 4, 4, layers, recompute=lambda s, c: 6)
    a, b, c = simulate(plain, cost), simulate(elem, cost), simulate(whole, cost)
    shape = ChunkShape((8192,))
    assert cost.recompute_ms(shape, 1, 5) == pytest.approx(cost.recompute_ms(shape, 1) + 5 * 3e-5 * 8192)
    assert b.recompute_time_s == pytest.approx(16 * cost.recompute_ms(shape, 1, 5) / 1e3)
    assert a.iteration_time_s < b.iteration_time_s < c.iteration_time_s
    assert all(x < y < z for z, y, x in zip(a.peak_memory_bytes, b.peak_memory_bytes, c.peak_memory_bytes))
    m = cost.chunk_memory(shape, 8)
    assert m.held(1, 5) == pytest.approx(m.held(1) - 5 * 38400.0 * 8192)
    assert Plan.loads(elem.dumps()).stage_actions == elem.stage_actions
    with pytest.raises(ValueError, match="elementwise-recompute terms"):
        base.recompute_ms(shape, 0, 1)


def test_a_plan_recomputing_more_layers_than_a_stage_has_is_refused():
    plan = epp_schedule([Chunk(0, (Segment(0, 0, 64),))], [64], 2, [2, 2])
    too_many = dataclasses.replace(plan, stage_actions=(plan.stage_actions[0], tuple(
        Action(a.kind, a.chunk_id, 1, 2) for a in plan.stage_actions[1])))
    with pytest.raises(ValueError, match="recomputes 1 layers \\(and 2 elementwise\\), the stage has 2"):
        validate_plan(too_many)
    mixed = dataclasses.replace(plan, stage_actions=(plan.stage_actions[0], tuple(
        Action(a.kind, a.chunk_id, 0, int(a.kind == "F")) for a in plan.stage_actions[1])))
    with pytest.raises(ValueError, match="different recompute"):
        validate_plan(mixed)
    with pytest.raises(ValueError, match="expected \\[kind, chunk, recompute"):
        Action.from_json(["F", 0, 1, 2, 3])


def test_out_of_memory_is_reported_with_stage_time_and_excess_not_raised():
    cost = h100_like_cost()
    plan = equal_chunks_plan(8, 4, 65536, cost)
    budget = 40 * 2**30
    result = simulate(plan, cost, memory_budget=budget)
    assert not result.feasible
    worst = {o.stage: o for o in result.oom}
    for p, peak in enumerate(result.peak_memory_bytes):
        if peak > budget:
            assert worst[p].over_bytes == pytest.approx(peak - budget)
            assert 0 <= worst[p].time_s <= result.iteration_time_s
            assert f"stage {p}" in str(worst[p])
    assert simulate(plan, cost, memory_budget=10 * 2**40).feasible


def test_budget_defaults_to_the_plans_metadata():
    cost = h100_like_cost()
    plan = equal_chunks_plan(2, 2, 1024, cost)
    tight = Plan.from_json({**plan.to_json(), "metadata": {"memory_budget": 1}})
    assert not simulate(tight, cost).feasible


def test_json_has_the_documented_fields():
    cost = h100_like_cost()
    out = simulate(equal_chunks_plan(3, 2, 1024, cost), cost, memory_budget=80 * 2**30).to_json()
    json.dumps(out)
    for key in ("planner", "iteration_time_s", "bubble_ratio", "recompute_time_s", "feasible",
                "peak_memory_bytes", "num_chunks", "num_pipelines"):
        assert key in out
    assert out["planner"] == "test" and out["num_chunks"] == 3 and len(out["peak_memory_bytes"]) == 2


def test_plan_for_another_layer_count_is_refused():
    cost = h100_like_cost()
    chunks = [Chunk(0, (Segment(0, 0, 10),))]
    plan = Plan((10,), tuple(chunks), ((Action("F", 0), Action("B", 0)),), (3,))
    with pytest.raises(ValueError, match="layers"):
        simulate(plan, cost)


def test_chart_is_written_as_png(tmp_path):
    from infinipipe.sim.charts import draw_chart

    cost = h100_like_cost()
    chunks = [Chunk(0, (Segment(0, 0, 4000),)), Chunk(1, (Segment(0, 4000, 6000), Segment(1, 0, 500)))]
    plan = epp_schedule(chunks, [6000, 500], 2, [16, 16], recompute=lambda s, c: 2)
    out = draw_chart(plan, simulate(plan, cost, memory_budget=80 * 2**30), tmp_path / "g.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
