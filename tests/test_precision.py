"""Mixed precision: bf16 compute, fp32 master weights and gradients; profiles carry their precision."""
from __future__ import annotations

import pytest
import torch

from chunking import sequential_plan
from infinipipe.contract.cost import default_profile
from infinipipe.contract.ir import Chunk, Segment
from infinipipe.contract.model_config import ModelConfig
from infinipipe.runtime.batch import Batch
from infinipipe.runtime.executor import PipelineWorker, RuntimeSettings
from infinipipe.runtime.launch import launch_local
from infinipipe.runtime.parallel_dims import ParallelDims
from infinipipe.train.planning import check_precision

CFG = ModelConfig(vocab_size=97, hidden=32, layers=2, heads=4, kv_heads=2, ffn=64)


def _step(master_dtype):
    settings = RuntimeSettings(dtype=torch.bfloat16, master_dtype=master_dtype)
    worker = PipelineWorker(CFG, (2,), ParallelDims(pp=1).build_mesh(), settings)
    lengths = [40, 7]
    chunks = [Chunk(0, (Segment(0, 0, 20),)), Chunk(1, (Segment(0, 20, 40), Segment(1, 0, 7)))]
    batch = Batch.of([[i % 97 for i in range(n)] for n in lengths])
    worker.run_step(sequential_plan(chunks, lengths, (2,)), batch)
    return {n: (p.dtype, p.grad.dtype) for n, p in worker.weights.named_parameters()}, \
        {n: (p.dtype, p.grad) for n, p in worker.model.named_parameters()}


def test_bf16_stage_accumulates_gradients_in_fp32_master_weights():
    weights, model = launch_local(_step, 1, (torch.float32,), timeout_s=60)[0]
    assert set(weights.values()) == {(torch.float32, torch.float32)}
    assert set(model.values()) == {(torch.bfloat16, None)}


def test_planning_with_a_profile_of_another_precision_is_an_error():
    profile = default_profile("tiny")
    check_precision(profile, torch.float32)
    with pytest.raises(ValueError, match="measured in float32, this run trains in bfloat16"):
        check_precision(profile, torch.bfloat16)
