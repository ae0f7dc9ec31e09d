"""A job plans with its own layout: Ulysses SP and FSDP degrees from [parallelism], links from
[cluster], so per-rank memory and collective times are those of the ranks that will run."""
from __future__ import annotations

import json

import numpy as np
import pytest

from infinipipe.config import load_config
from infinipipe.contract.layout import LinkModel, StageLayout
from infinipipe.data.dataset import BatchSampler
from infinipipe.runtime.parallel_dims import ParallelDims
from infinipipe.sim.simulator import simulate
from infinipipe.train.planning import StepPlanner, job_cost
from infinipipe.train.validate import check_config

LENGTHS = np.array([4096, 2000, 1500, 900, 700, 300, 200, 120, 80])


def _step_zero(overrides: list[str]):
    """Step 0 of a job planned as the trainer plans it (without a planning deadline, so the plan
    depends on its inputs alone), and its simulated peak memory per stage."""
    cfg = load_config(None, ["--training.global_batch_tokens=8192", "--epp.memory_budget=1GiB",
                             "--epp.deadline_share=0", *overrides])
    shape = check_config(cfg)
    dims = ParallelDims.from_config(cfg.parallelism)
    planner = StepPlanner(shape.cost, BatchSampler(LENGTHS, 0, global_batch_tokens=8192), cfg.epp.planner, dims.pp,
                          dims.dp, cfg.epp.memory_budget_bytes, shape.layers_per_stage, cfg.epp.planner_options())
    plans = planner(0)
    return shape.cost, [simulate(p, shape.cost, cfg.epp.memory_budget_bytes).peak_memory_bytes for p in plans.plans]


def test_sequence_parallel_job_plans_with_its_layout_and_less_memory_per_rank():
    alone, (peaks_alone,) = _step_zero([])
    sp, (peaks_sp,) = _step_zero(["--parallelism.sequence_parallel_degree=2"])
    assert alone.layout == StageLayout()
    assert (sp.layout.sp, sp.layout.fsdp, sp.layout.reshard_per_chunk) == (2, 2, False)
    assert all(s < a for s, a in zip(peaks_sp, peaks_alone))


def test_fsdp_shards_over_dp_shard_times_sp_and_the_cluster_links_reach_the_layout(tmp_path):
    cfg = load_config(None, ["--parallelism.sequence_parallel_degree=2", "--parallelism.data_parallel_shard_degree=2",
                             "--cluster.gpus_per_node=4", "--cluster.intra_node_bandwidth_gbps=800",
                             "--cluster.inter_node_latency_us=20"])
    cost = job_cost(cfg, cfg.model_config())
    layout = cost.layout
    assert (layout.sp, layout.fsdp, layout.gpus_per_node) == (2, 4, 4)
    assert layout.intra_node == LinkModel(10e-6, 100e9) and layout.inter_node == LinkModel(20e-6, 25e9)
    one = job_cost(load_config(None), cfg.model_config())
    assert cost.model_state_bytes(2) < one.model_state_bytes(2)
    links = tmp_path / "links.json"
    links.write_text(json.dumps({"version": 1, "intra_node": {"latency_s": 5e-5, "bandwidth_Bps": 2e9}}))
    measured = job_cost(load_config(None, [f"--cluster.links={links}"]), cfg.model_config()).layout
    assert measured.intra_node == LinkModel(5e-5, 2e9) and measured.inter_node == LinkModel(10e-6, 25e9)


@pytest.mark.parametrize("override, message", [
    ("--cluster.gpus_per_node=0", "cluster.gpus_per_node must be >= 1"),
    ("--cluster.inter_node_bandwidth_gbps=0", "cluster.inter_node_bandwidth_gbps must be > 0"),
    ("--cluster.intra_node_latency_us=-1", "cluster.intra_node_latency_us must be >= 0"),
    ("--cluster.links=no-such-links.json", "cluster.links: links file no-such-links.json"),
])
def test_bad_cluster_settings_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])
