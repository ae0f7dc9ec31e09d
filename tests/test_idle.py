"""Where a stage's idle time lies (`sim/idle.py`): categories that add up with busy time to the
iteration, each one what the stage waited for."""
from __future__ import annotations

import dataclasses
import json

import pytest

from infinipipe.cli import main
from infinipipe.contract.cost import CostModel, default_profile
from infinipipe.contract.host import HostLink
from infinipipe.contract.ir import Action, Chunk, Plan, Segment, validate_plan
from infinipipe.contract.layout import StageLayout
from infinipipe.contract.model_config import preset
from infinipipe.contract.shapes import ChunkShape
from infinipipe.planners.options import PlannerOptions
from infinipipe.planners.registry import make_plan
from infinipipe.planners.request import PlanRequest
from infinipipe.planners.schedule import epp_schedule
from infinipipe.sim.idle import CATEGORIES, IdleBreakdown
from infinipipe.sim.simulator import SimResult, simulate
from test_host_tier import offloading
from test_simulator import NO_LINK, equal_chunks_plan, h100_like_cost

GiB = 2**30
COST_7B = CostModel(default_profile("llama-7b"), preset("llama-7b"))
FAST = PlannerOptions(time_limit_s=1.0)
SLOW_LINK = HostLink(h2d_Bps=1e8, d2h_Bps=1e10, h2d_concurrent_Bps=1e8, d2h_concurrent_Bps=1e10, latency_s=0.0,
                     host_memory_bytes=64 * GiB)


def with_link(cost: CostModel, link: HostLink) -> CostModel:
    return dataclasses.replace(cost, profile=dataclasses.replace(cost.profile, host_link=link))


def epp_1f1b() -> tuple[Plan, CostModel]:
    lengths = [3000, 2500, 2000, 1800, 1500, 1200, 900, 800, 600, 500, 400, 300]
    return make_plan("epp", PlanRequest(lengths, COST_7B, 4, 80 * GiB, options=FAST)), COST_7B


def split_sequences() -> tuple[Plan, CostModel]:
    chunks = [Chunk(0, (Segment(0, 0, 6000),)), Chunk(1, (Segment(0, 6000, 9000), Segment(1, 0, 2000))),
              Chunk(2, (Segment(2, 0, 5000),)), Chunk(3, (Segment(2, 5000, 7000),))]
    plan = epp_schedule(chunks, [9000, 2000, 7000], 4, [8] * 4, recompute=lambda s, c: (s + c) % 3)
    return plan, h100_like_cost()


def two_pipelines() -> tuple[Plan, CostModel]:
    chunks = [Chunk(i, (Segment(i, 0, n),)) for i, n in enumerate([8000, 1000, 3000, 6000, 500, 2000])]
    plan = epp_schedule(chunks, [c.segments[0].end for c in chunks], 4, [8] * 4, pipelines=[[0, 1, 2], [3, 4, 5]])
    return plan, h100_like_cost()


def fsdp_layout() -> tuple[Plan, CostModel]:
    cost = dataclasses.replace(h100_like_cost(), layout=StageLayout(sp=2, fsdp=8))
    return equal_chunks_plan(6, 4, 4096, cost), cost


def host_offload() -> tuple[Plan, CostModel]:
    lengths = [60000, 20000, 9000, 3000, 3000, 2000, 800, 500]
    request = PlanRequest(lengths, COST_7B, 4, 64 * GiB, options=FAST, host_memory_budget=128 * GiB)
    return make_plan("epp", request), COST_7B


def late_copy_back() -> tuple[Plan, CostModel]:
    cost = with_link(h100_like_cost(head=False), SLOW_LINK)
    return offloading(equal_chunks_plan(8, 4, 4096, cost), 0, 0, 8, 1), cost


def durations(cost: CostModel, shape: ChunkShape, layers: int, stage: int, stages: int) -> tuple[float, float]:
    first, last = stage == 0, stage == stages - 1
    return cost.forward_ms(shape, layers, first, last) / 1e3, cost.backward_ms(shape, layers, first, last) / 1e3


def category(result: SimResult, name: str) -> list[float]:
    return [getattr(b, name) for b in result.idle_breakdown]


@pytest.mark.parametrize("build", [epp_1f1b, split_sequences, two_pipelines, fsdp_layout, host_offload,
                                   late_copy_back])
def test_busy_and_the_idle_categories_add_up_to_the_iteration_on_every_stage(build):
    plan, cost = build()
    result = simulate(plan, cost)
    assert len(result.idle_breakdown) == plan.num_stages
    for s, idle in enumerate(result.idle_breakdown):
        assert all(v >= 0 for v in idle.to_json().values()), idle
        assert result.busy_s[s] + idle.total_s == pytest.approx(result.iteration_time_s, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("build", [epp_1f1b, split_sequences, two_pipelines, fsdp_layout, host_offload,
                                   late_copy_back])
def test_the_bubble_is_the_stages_imbalance_plus_the_busiest_stages_idle(build):
    """Each stage idles at least as long as the busiest stage works more than it; what is left of
    the bubble is the busiest stage's idle share, and the JSON carries both."""
    plan, cost = build()
    result = simulate(plan, cost)
    n, t = plan.num_stages, result.iteration_time_s
    assert min(result.imbalance_s) == 0.0
    assert all(0.0 <= gap <= idle + 1e-12 for gap, idle in zip(result.imbalance_s, result.idle_s))
    assert 0.0 <= result.schedule_bubble_ratio <= result.bubble_ratio
    assert result.bubble_ratio * n * t == pytest.approx(sum(result.imbalance_s) + result.schedule_bubble_ratio * n * t)
    out = result.to_json()
    assert out["imbalance_s"] == list(result.imbalance_s) and out["schedule_bubble_ratio"] == result.schedule_bubble_ratio


def test_a_last_stage_with_the_lm_head_makes_imbalance_that_no_order_removes():
    """Equal chunks on equal layer counts: the last stage also runs the LM head and the loss, so
    every other stage idles that much whatever the order, and the simulate text says so."""
    cost = h100_like_cost()
    plan = equal_chunks_plan(8, 4, 4096, cost)
    result = simulate(plan, cost)
    shape = ChunkShape((4096,))
    head = [sum(durations(cost, shape, plan.layers_per_stage[s], s, 4)) for s in range(4)]
    assert result.busy_s.index(max(result.busy_s)) == 3
    for s in range(3):
        assert result.imbalance_s[s] == pytest.approx(8 * (head[3] - head[s]))
    assert result.schedule_bubble_ratio < result.bubble_ratio


def test_fill_forward_wait_chain_and_drain_of_a_two_stage_plan_are_known_exactly():
    """Stage 0 runs F0 F1 B0 B1, stage 1 F0 B0 F1 B1, chunk 1 so long that stage 1 waits for its
    forward after B0, and stage 0 waits for B1's gradient with no forward left."""
    cost = h100_like_cost(head=False)
    chunks = (Chunk(0, (Segment(0, 0, 1024),)), Chunk(1, (Segment(1, 0, 8192),)))
    order = ((Action("F", 0), Action("F", 1), Action("B", 0), Action("B", 1)),
             (Action("F", 0), Action("B", 0), Action("F", 1), Action("B", 1)))
    plan = Plan((1024, 8192), chunks, order, (16, 16))
    validate_plan(plan)
    (a0, b0), (a1, b1) = (durations(cost, ChunkShape((n,)), 16, 0, 2) for n in (1024, 8192))
    (c0, d0), (c1, d1) = (durations(cost, ChunkShape((n,)), 16, 1, 2) for n in (1024, 8192))
    assert a1 > c0 + d0  # stage 1 is idle between B0 and F1
    result = simulate(plan, cost, link=NO_LINK)
    assert result.iteration_time_s == pytest.approx(a0 + a1 + c1 + d1 + b1)
    first, second = result.idle_breakdown
    assert first.to_json() == pytest.approx(IdleBreakdown(chain=c1 + d1 - b0).to_json())
    assert second.to_json() == pytest.approx(IdleBreakdown(fill=a0, forward_wait=a1 - c0 - d0, drain=b1).to_json())


def test_an_order_that_holds_a_ready_forward_back_is_memory_idle_and_running_it_is_busy():
    cost = h100_like_cost(head=False)
    chunks = tuple(Chunk(i, (Segment(i, 0, 4096),)) for i in range(2))
    f, b = durations(cost, ChunkShape((4096,)), 16, 0, 2)
    one_in_flight = (Action("F", 0), Action("B", 0), Action("F", 1), Action("B", 1))
    both_in_flight = (Action("F", 0), Action("F", 1), Action("B", 0), Action("B", 1))
    held = Plan((4096, 4096), chunks, (one_in_flight, one_in_flight), (16, 16))
    runs = Plan((4096, 4096), chunks, (both_in_flight, one_in_flight), (16, 16))
    validate_plan(held)
    validate_plan(runs)
    held_sim, runs_sim = simulate(held, cost, link=NO_LINK), simulate(runs, cost, link=NO_LINK)
    # Stage 0 waits for B0's gradient from f to 2f + b while F1, needing no input, could run.
    assert category(held_sim, "memory")[0] == pytest.approx(f + b)
    assert category(runs_sim, "memory") == [0.0, 0.0]
    f1 = next(iv for iv in runs_sim.intervals if iv.stage == 0 and iv.kind == "F" and iv.chunk_id == 1)
    assert (f1.start_s, f1.end_s) == pytest.approx((f, 2 * f))


def test_waits_for_copies_back_from_the_host_and_for_the_optimizer_state_are_memory_idle():
    """One stage, so nothing waits for a neighbour: chunk 0's layers come back over a slow link
    from B1's start, and the optimizer state only after the last action."""
    cost = with_link(h100_like_cost(head=False), SLOW_LINK)
    chunks = tuple(Chunk(i, (Segment(i, 0, 4096),)) for i in range(2))
    order = (Action("F", 0, offload_layers=32), Action("F", 1), Action("B", 1),
             Action("B", 0, offload_layers=32, reload_lead=1))
    plan = Plan((4096, 4096), chunks, (order,), (32,),
                metadata={"offload_optimizer": True, "optimizer_reload_lead": [0]})
    validate_plan(plan)
    result = simulate(plan, cost, link=NO_LINK)
    (idle,) = result.idle_breakdown
    assert result.optimizer_wait_s[0] > 0 and result.exposed_copy_s[0] > result.optimizer_wait_s[0]
    assert idle.to_json() == pytest.approx(IdleBreakdown(memory=result.exposed_copy_s[0]).to_json())


def test_fsdp_all_gather_and_reduce_scatter_are_collectives_not_fill_or_drain():
    plan, cost = fsdp_layout()
    result = simulate(plan, cost)
    steps = [cost.step_fsdp_s(n, s == 0, s == 3) for s, n in enumerate(plan.layers_per_stage)]
    assert all(gather > 0 for gather, _ in steps)
    assert category(result, "collectives") == pytest.approx([gather + reduce for gather, reduce in steps])
    assert category(result, "fill")[0] == 0.0 and category(result, "drain")[0] == pytest.approx(0.0, abs=1e-12)


def test_json_carries_each_stages_breakdown_and_the_totals(tmp_path, capsys):
    plan, cost = split_sequences()
    out = json.loads(json.dumps(simulate(plan, cost).to_json()))
    assert [set(stage) for stage in out["idle_breakdown"]] == [set(CATEGORIES)] * 4
    for s, stage in enumerate(out["idle_breakdown"]):
        assert sum(stage.values()) == pytest.approx(out["idle_s"][s])
    assert out["idle_totals"] == pytest.approx(
        {c: sum(stage[c] for stage in out["idle_breakdown"]) for c in CATEGORIES})
    profile = tmp_path / "profile.json"
    cost.profile.save(profile)
    path = tmp_path / "plan.json"
    path.write_text(plan.dumps())
    assert main(["simulate", str(path), "--profile", str(profile), "--model", "llama-7b", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)["idle_breakdown"]
    assert all(mine == pytest.approx(theirs) for mine, theirs in zip(printed, out["idle_breakdown"], strict=True))


def test_text_output_names_each_stages_idle_and_the_costliest_category(tmp_path, capsys):
    plan, cost = split_sequences()
    profile = tmp_path / "profile.json"
    cost.profile.save(profile)
    path = tmp_path / "plan.json"
    path.write_text(plan.dumps())
    assert main(["simulate", str(path), "--profile", str(profile), "--model", "llama-7b"]) == 0
    lines = capsys.readouterr().out.splitlines()
    idle_lines = [line.strip() for line in lines if line.strip().startswith("idle ")]
    assert len(idle_lines) == 4 and all("fill" in line and "chain" in line and "drain" in line for line in idle_lines)
    total = IdleBreakdown.summed(simulate(plan, cost).idle_breakdown)
    assert any(line.strip().startswith(f"most idle time: {total.largest.replace('_', ' ')},") for line in lines)
    result = simulate(plan, cost)
    schedule = result.schedule_bubble_ratio
    assert any(f"({result.bubble_ratio - schedule:.1%} stage imbalance, {schedule:.1%} the schedule's)" in line
               for line in lines)


def test_chart_shades_idle_gaps_by_category(tmp_path):
    import matplotlib.image
    from matplotlib.colors import to_rgb

    from infinipipe.sim.charts import IDLE_COLOURS, draw_chart

    plan, cost = two_pipelines()
    result = simulate(plan, cost)
    shown = {span.category for span in result.idle_spans()}
    assert len(shown) >= 3
    out = draw_chart(plan, result, tmp_path / "idle.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = (matplotlib.image.imread(out)[..., :3] * 255).round().astype(int)

    def area(name: str) -> int:
        return int((pixels == [round(c * 255) for c in to_rgb(IDLE_COLOURS[name])]).all(axis=-1).sum())

    assert all(area(name) > 0 for name in shown)
    # More than the legend's swatch: the gaps themselves are shaded.
    assert area(IdleBreakdown.summed(result.idle_breakdown).largest) > 2000
