"""FSDP2 (`fully_shard`) of one stage over its ``dp_shard x sp`` ranks, gathered once per step.

Each decoder layer is one FSDP unit and the stage itself (embedding, final norm, head) the root.
With ``dp_replicate > 1`` the mesh is 2-D: FSDP shards inside a replica group and all-reduces the
reduced shards across the groups (HSDP), so gradient traffic that crosses groups carries shards.
The sharded parameters are the master weights: the optimizer steps them and checkpoints hold
them (DCP writes each rank's shards). Under bf16 they stay fp32 and FSDP gathers them in bf16 and
reduces gradients in fp32 (``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``);
inputs are not cast, since the runtime already hands the stage activations in the compute dtype.

Timing: a step runs many chunks forward and backward, interleaved by the schedule, so per-chunk
gathers would cost a layer's all-gather per action. Instead the step starts by gathering every
unit (`ShardedStage.begin_step`) and the weights stay gathered (``reshard_after_forward=False``,
reshard after backward off); every backward accumulates whole gradients without communication
(gradient sync off; in the reduce dtype, so bf16 gradients accumulate in fp32). After the stage's
last backward, `ShardedStage.end_step` switches sync and resharding on and runs each unit's
post-backward once, in module order: one reduce-scatter per unit (plus the all-reduce across
replica groups under HSDP), which also frees the gathered weights. This is the cost model's
once-per-step timing (`StageLayout.reshard_per_chunk=False`).

The reduction runs after the backwards rather than inside the last one (sync switched on before
it, with FSDP's public setters only) because FSDP's hooks fire in autograd's order, and the ranks
of a shard group run different chunks (each replica trains its own sequences): a last chunk
whose graph differs fires the units' hooks in another order, so the ranks' collectives would not
match. Calling each parameter
group's ``post_backward`` and then the root's final callback is what
``torch.distributed.pipelining`` does for FSDP stages (``perform_reduce_grad``); it reaches
into FSDP's state for the groups.

Gradients are summed, not averaged (divide factor 1): every token loss is already divided by the
global batch's predicted tokens, so the sum over ranks is the global-batch gradient, as the
unsharded runtime's all-reduce gives. The collectives use plain SUM (``set_force_sum_reduction_for_comms``):
a divide factor otherwise selects NCCL's ``PREMUL_SUM``, which gloo lacks; gloo has the
reduce-scatter and all-gather FSDP needs.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..model.stage import StageModel


class ShardedStage:
    """``model`` sharded with `fully_shard` over ``mesh``, computing in ``compute_dtype``.

    The model must hold its parameters in the master dtype (which gradients are reduced in).
    """

    def __init__(self, model: StageModel, mesh: DeviceMesh, compute_dtype: torch.dtype):
        master = next(model.parameters()).dtype
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=master, cast_forward_inputs=False)
        for layer in model.ordered_layers():
            fully_shard(layer, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
        fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
        self.model = model
        self.units: list[FSDPModule] = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in self.units:
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
        # Every rank reduce-scatters every parameter, even one its chunks left without a gradient.
        self.root.set_reduce_scatter_unused_params(True)

    @property
    def root(self) -> FSDPModule:
        return self.model  # type: ignore[return-value]

    def begin_step(self) -> None:
        """Gather every unit's weights for the whole step; backwards accumulate without communication."""
        self.root.set_requires_gradient_sync(False)
        self.root.set_reshard_after_backward(False)
        self.root.set_is_last_backward(False)
        for unit in self.units:
            unit.unshard()

    def end_step(self) -> None:
        """After the stage's last backward: reduce the accumulated gradients into shards, every
        unit in the same order on every rank, and free the gathered weights. Gradients that W
        actions made after a unit's last backward are first added, as a backward's would be, to
        what the unit accumulates in the reduce dtype."""
        state = fully_shard.state(self.model)
        groups = [group for unit_state in state._state_ctx.all_states for group in unit_state._fsdp_param_groups]
        for group in groups:
            group.post_backward()
        self.root.set_requires_gradient_sync(True)
        self.root.set_reshard_after_backward(True)
        self.root.set_is_last_backward(True)
        for group in groups:
            group.post_backward()
        state._root_post_backward_final_callback()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a sharded DTensor gathered, a plain tensor as it is (collective for a DTensor)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient by name, whole (collective over the shard group under FSDP)."""
    return {n: full_tensor(p.grad) for n, p in model.named_parameters() if p.grad is not None}
