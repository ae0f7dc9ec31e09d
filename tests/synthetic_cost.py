"""A small cost model with round coefficients, for planner tests whose answers are checked by hand."""
from __future__ import annotations

from infinipipe.contract.cost import CostModel, LinearTerm, Profile
from infinipipe.contract.model_config import PRESETS

MODEL = PRESETS["tiny"].with_layers(8)
COST = CostModel(Profile(
    model=MODEL, device="synthetic", dtype="float16",
    layer_fwd=LinearTerm({"attn": 2e-6, "tokens": 1e-3, "chunk": 0.05}),
    layer_bwd=LinearTerm({"attn": 4e-6, "tokens": 2e-3, "chunk": 0.05}),
    layer_act_bytes=LinearTerm({"tokens": 2048.0}),
    head_work_bytes=LinearTerm({"tokens": 1024.0})), MODEL)
