"""DeepSpeed-Ulysses and FlexSP as planners: every sequence in exactly one SP group, groups that
tile the GPUs without straddling a node, on the same simulator as the pipelines."""
from __future__ import annotations

from infinipipe.contract.cost import MIXED_PRECISION_ADAM, CostModel, load_profile
from infinipipe.contract.ir import check_coverage
from infinipipe.contract.model_config import preset
from infinipipe.data.lengths import sample_lengths
from infinipipe.planners.registry import SP_PLANNERS
from infinipipe.planners.sp_baselines import group_splits

COST = CostModel(load_profile("h100-bf16-llama-13b"), preset("llama-13b"), MIXED_PRECISION_ADAM)
LENGTHS = sample_lengths("github", 48, 49152, seed=1)
BUDGET = 80 * 2**30


def test_group_splits_tile_the_gpus_and_keep_sub_node_groups_inside_a_node():
    splits = group_splits(32, 8)
    assert (32,) in splits and (8, 8, 8, 8) in splits and (16, 8, 4, 2, 1, 1) in splits
    for split in splits:
        assert sum(split) == 32 and len(split) <= 8 and list(split) == sorted(split, reverse=True)
        assert all(s <= 8 and 8 % s == 0 or s % 8 == 0 for s in split)


def test_ulysses_is_one_sp_group_of_every_gpu_covering_the_batch():
    plan = SP_PLANNERS["ulysses"](COST, LENGTHS, 32, BUDGET)
    (group,) = plan.groups
    assert group.sp == 32 and group.plan.num_stages == 1 and group.plan.metadata["sp"] == 32
    check_coverage(group.plan.chunks, LENGTHS)
    assert plan.feasible and plan.iteration_time_s == group.result.iteration_time_s
    assert all(len(c.segments) >= 1 and all(s.start == 0 for s in c.segments) for c in group.plan.chunks)


def test_flexsp_assigns_every_sequence_to_exactly_one_group():
    plan = SP_PLANNERS["flexsp"](COST, LENGTHS, 32, BUDGET)
    assert sum(g.sp for g in plan.groups) == 32
    ids = sorted(i for g in plan.groups for i in g.seq_ids)
    assert ids == list(range(len(LENGTHS)))
    for g in plan.groups:
        check_coverage(g.plan.chunks, [LENGTHS[i] for i in g.seq_ids])
        assert g.plan.metadata["sp"] == g.sp
    assert plan.iteration_time_s == max(g.result.iteration_time_s for g in plan.groups)
    assert 0.0 <= plan.idle_ratio < 1.0
