"""Ulysses SP and FSDP inside a stage: compute and activations divided over the SP ranks, two
all-to-alls per layer (bytes / bandwidth + latency), FSDP traffic and sharded model states, and
which pipeline hops cross nodes."""
from __future__ import annotations

import math

import pytest

from infinipipe.contract.cost import MIXED_PRECISION_ADAM, CostModel, load_profile
from infinipipe.contract.layout import LinkModel, StageLayout
from infinipipe.contract.model_config import preset
from infinipipe.contract.shapes import ChunkShape
from infinipipe.sim.simulator import simulate
from test_simulator import NO_LINK, equal_chunks_plan

PROFILE = load_profile("h100-bf16-llama-13b")
MODEL = preset("llama-13b")
SHAPE = ChunkShape((8192, 4096), prefix=16384)
INTRA = LinkModel(latency_s=5e-6, bandwidth_Bps=100e9)
INTER = LinkModel(latency_s=20e-6, bandwidth_Bps=10e9)


def cost(**layout) -> CostModel:
    return CostModel(PROFILE, MODEL, MIXED_PRECISION_ADAM,
                     StageLayout(intra_node=INTRA, inter_node=INTER, **layout))


def test_one_rank_layout_gives_the_profiles_own_figures():
    plain = CostModel(PROFILE, MODEL, MIXED_PRECISION_ADAM)
    p = PROFILE
    assert plain.forward_ms(SHAPE, 10, first=True) == 10 * p.layer_fwd(SHAPE) + p.embed_fwd(SHAPE)
    assert plain.backward_ms(SHAPE, 10, last=True) == 10 * p.layer_bwd(SHAPE) + p.head_bwd(SHAPE)
    packed = ChunkShape((8192, 4096))  # no split sequence: no K/V store rows to set aside
    assert plain.layer_act_bytes(packed) == p.layer_act_bytes(packed)
    assert plain.model_state_bytes(10) == 10 * MODEL.layer_params() * MIXED_PRECISION_ADAM.per_param


def test_ulysses_forward_is_compute_over_sp_plus_two_all_to_alls_per_layer():
    sp = 8
    c = cost(sp=sp, fsdp=sp)
    f = PROFILE.layer_fwd.coef
    feats = SHAPE.features
    compute = f["attn"] * feats["attn"] / sp + f["kv"] * feats["kv"] / sp + f["tokens"] * feats["tokens"] / sp + f["chunk"]
    per_rank = SHAPE.tokens / sp * (2 * MODEL.hidden + 2 * MODEL.kv_dim) * 2
    a2a_ms = (2 * INTRA.latency_s + per_rank * (sp - 1) / sp / INTRA.bandwidth_Bps) * 1e3
    assert c.all_to_all_ms(SHAPE) == pytest.approx(a2a_ms, rel=1e-12)
    assert c.forward_ms(SHAPE, 10) == pytest.approx(10 * (compute + a2a_ms), rel=1e-12)
    assert c.recompute_ms(SHAPE, 3) == pytest.approx(3 * (compute + a2a_ms), rel=1e-12)


def test_all_to_all_across_nodes_is_bound_by_the_inter_node_link():
    within, across = cost(sp=8), cost(sp=32)
    per_rank = SHAPE.tokens / 32 * (2 * MODEL.hidden + 2 * MODEL.kv_dim) * 2
    expected = 2 * INTER.latency_s + per_rank * 24 / 32 / INTER.bandwidth_Bps
    assert across.all_to_all_ms(SHAPE) == pytest.approx(expected * 1e3, rel=1e-12)
    assert across.all_to_all_ms(SHAPE) > within.all_to_all_ms(SHAPE)


def test_uneven_heads_cost_the_busiest_rank():
    model30 = preset("llama-30b")  # 52 heads: 8 ranks hold 7 heads at most
    c = CostModel(load_profile("h100-bf16-llama-30b"), model30, layout=StageLayout(sp=8))
    attn_only = ChunkShape((4096,))
    share = c._layer_fwd.coef["attn"] / c.profile.layer_fwd.coef["attn"]
    assert share == pytest.approx(math.ceil(52 / 8) / 52) and share > 1 / 8
    assert c.kv_bytes(ChunkShape((4096,), kept=4096), 1) == pytest.approx(
        2 * 4096 * model30.kv_dim * 2 * 7 / 52)
    assert c.forward_ms(attn_only, 1) > 0


def test_activations_divide_by_sp():
    one, eight = cost(), cost(sp=8)
    for rec in (0, 4, 10):
        held = eight.activation_bytes(SHAPE, 10, rec, first=True, last=True)
        chunk_overhead = 10 * PROFILE.layer_act_bytes.coef.get("chunk", 0.0) * (rec < 10) * (10 - rec) / 10
        expected = (one.activation_bytes(SHAPE, 10, rec, first=True, last=True) - chunk_overhead) / 8 + chunk_overhead
        assert held == pytest.approx(expected, rel=1e-9)
    assert eight.head_work_bytes(ChunkShape((8192,))) == pytest.approx(one.head_work_bytes(ChunkShape((1024,))))


def test_model_states_shard_over_fsdp_ranks():
    opt = MIXED_PRECISION_ADAM
    params = 10 * MODEL.layer_params() + MODEL.embedding_params()
    zero3 = cost(sp=8, fsdp=8, reshard_per_chunk=True)
    assert zero3.model_state_bytes(10, first=True) == pytest.approx(
        params * opt.per_param / 8 + MODEL.layer_params() * (2 * opt.param_bytes + opt.grad_bytes))
    per_step = cost(sp=8, fsdp=8)
    assert per_step.model_state_bytes(10, first=True) == pytest.approx(
        params * (opt.param_bytes + opt.grad_bytes) + params * (opt.param_bytes + opt.state_bytes) / 8)
    whole = cost().model_state_bytes(10, first=True)
    assert zero3.model_state_bytes(10, first=True) < per_step.model_state_bytes(10, first=True) < whole


def test_zero3_per_chunk_traffic_hides_behind_long_compute_only():
    zero3 = cost(sp=8, fsdp=8, reshard_per_chunk=True)
    gathered = cost(sp=8, fsdp=8)
    gather_ms = zero3.layout.fsdp_s(10 * MODEL.layer_params() * 2) * 1e3
    tiny, big = ChunkShape((128,)), ChunkShape((65536,))
    assert zero3.forward_ms(tiny, 10) == pytest.approx(gather_ms)
    assert zero3.forward_ms(big, 10) == gathered.forward_ms(big, 10) > gather_ms


@pytest.mark.parametrize("stages", [1, 4])
def test_simulator_adds_the_once_per_step_gather_and_reduce_scatter(stages):
    base, sharded = cost(sp=8), cost(sp=8, fsdp=8)
    plan = equal_chunks_plan(6, stages, 8192, base)
    t0 = simulate(plan, base, link=NO_LINK).iteration_time_s
    t1 = simulate(plan, sharded, link=NO_LINK).iteration_time_s
    # Stage 0 starts the first forward and (1F1B) ends with the last backward: both collectives show.
    gather, reduce = sharded.step_fsdp_s(plan.layers_per_stage[0], first=True, last=stages == 1)
    assert gather > 0 and reduce > 0
    assert t1 == pytest.approx(t0 + gather + reduce, rel=1e-12)


@pytest.mark.parametrize("layout,stages,crossing", [
    (dict(), 8, []),                                  # one GPU a stage, one node holds them all
    (dict(), 16, [7]),                                # the ninth stage starts the second node
    (dict(sp=8, fsdp=8), 4, [0, 1, 2]),               # a node per stage: the paper's layout
    (dict(sp=4, fsdp=4), 4, [1]),                     # two stages a node
    (dict(sp=2, fsdp=2, dp_replicate=2), 4, [1]),     # replicas count: four ranks a stage
    (dict(sp=3, fsdp=3), 4, [1, 2]),                  # stage 2 straddles two nodes
])
def test_hops_cross_nodes_where_the_stages_ranks_do(layout, stages, crossing):
    hops = StageLayout(intra_node=INTRA, inter_node=INTER, **layout).hop_links(stages)
    assert [h for h, link in enumerate(hops) if link == INTER] == crossing
    assert len(hops) == stages - 1
