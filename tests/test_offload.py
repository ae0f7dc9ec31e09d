"""Offloaded layers' saved tensors wait in host memory and come back exact: loss and gradients equal
the full-sequence run under late copies, a removed wait shows, and memory moves from device to host."""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from chunking import HAND_CHUNKS, HAND_LENGTHS, sequential_plan, with_offload
from infinipipe.contract.ir import Action, Chunk, Plan, Segment, validate_plan
from infinipipe.contract.model_config import ModelConfig
from infinipipe.planners.schedule import epp_schedule
from infinipipe.runtime.batch import Batch
from infinipipe.runtime.full_sequence import reference_loss
from infinipipe.runtime.live_bytes import LiveBytesMeter
from infinipipe.runtime.local import build_stages, run_plan_local
from infinipipe.runtime.offload import LATE_COPIES_MS_VAR, HostTier, ImmediateCopies, LateCopies, Offloader, reload_points
from infinipipe.runtime.stage_compute import StageCompute
from reference_check import assert_matches_reference

CFG = ModelConfig(vocab_size=97, hidden=32, layers=5, heads=4, kv_heads=2, ffn=64)
TOL = {torch.float64: 1e-5, torch.float32: 1e-4}
CPU = torch.device("cpu")
SPLIT = (2, 3)
LOSS_BLOCK = 16


def _batch(seed=5):
    g = torch.Generator().manual_seed(seed)
    return Batch(tuple(torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in HAND_LENGTHS))


def _reference(batch, dtype):
    (model,) = build_stages(CFG, [CFG.layers], dtype=dtype)
    loss = reference_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _run(plan, dtype, batch, reserve=1 << 22):
    stages = build_stages(CFG, SPLIT, dtype=dtype)
    tiers = [HostTier(CPU, reserve) for _ in SPLIT]
    loss = run_plan_local(plan, stages, batch, host_tiers=tiers, late_copies=True)
    grads = {n: p.grad for m in stages for n, p in m.named_parameters() if p.grad is not None}
    return loss, grads, tiers


MODES = [(0, 0, 1), (1, 0, 2), (0, 2, 2), (1, 1, 3), (2, 0, 3), (0, 1, 1), (1, 2, 3), (0, 0, 0)]


def mixed_modes(s, cid, n):
    """Stored, elementwise and whole-recompute layers beside offloaded ones (some offloaded layers
    recomputed, so their checkpoint's input moves), different per chunk and stage."""
    fits = [m for m in MODES if m[0] + m[1] <= n and m[2] <= n]
    return fits[(s * 3 + cid) % len(fits)]


@pytest.mark.parametrize("kind", sorted(HAND_CHUNKS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_offloaded_split_packed_and_hybrid_chunks_equal_the_reference_under_late_copies(kind, dtype):
    base = epp_schedule(HAND_CHUNKS[kind], HAND_LENGTHS, 2, list(SPLIT))
    for lead in (min, max):
        plan = with_offload(base, mixed_modes, lead)
        assert any(a.offload_layers for acts in plan.stage_actions for a in acts)
        batch = _batch()
        loss, grads, tiers = _run(plan, dtype, batch)
        assert all(t.in_use == 0 for t in tiers) and max(t.in_use_peak for t in tiers) > 0
        assert_matches_reference(loss, grads, *_reference(batch, dtype), TOL[dtype], f"{kind}, lead {lead.__name__}")


def _quick_reload_plan() -> Plan:
    """Every forward first, every layer of every chunk but the last offloaded, each reload
    starting right after its forward (so it runs while the copy out is still under way)."""
    chunks = HAND_CHUNKS["split"]
    base = sequential_plan(chunks, HAND_LENGTHS, list(SPLIT), {c.id: c.id % 2 for c in chunks})
    last = len(chunks) - 1
    stages = []
    for s, actions in enumerate(base.stage_actions):
        n = SPLIT[s]
        stages.append(tuple(
            a if a.chunk_id == last else dataclasses.replace(
                a, offload_layers=n, reload_lead=i - a.chunk_id - 1 if a.kind == "B" else 0)
            for i, a in enumerate(actions)))
    plan = dataclasses.replace(base, stage_actions=tuple(stages))
    validate_plan(plan)
    return plan


def _backward_reads_a_reload_early(monkeypatch):
    monkeypatch.setattr(LateCopies, "compute_waits", lambda self, event: None)


def _reload_reads_the_host_early(monkeypatch):
    copy = LateCopies.copy
    monkeypatch.setattr(LateCopies, "copy", lambda self, dst, src, direction, after:
                        copy(self, dst, src, direction, [] if direction == "in" else after))


@pytest.mark.parametrize("remove", [_backward_reads_a_reload_early, _reload_reads_the_host_early])
def test_late_copies_turn_a_removed_wait_into_wrong_gradients(remove, monkeypatch):
    monkeypatch.setenv(LATE_COPIES_MS_VAR, "60")
    plan = _quick_reload_plan()
    batch = _batch()
    reference = _reference(batch, torch.float64)
    assert_matches_reference(*_run(plan, torch.float64, batch)[:2], *reference, TOL[torch.float64])
    remove(monkeypatch)
    with pytest.raises(AssertionError):
        assert_matches_reference(*_run(plan, torch.float64, batch)[:2], *reference, TOL[torch.float64])


def test_a_tier_without_room_keeps_tensors_on_the_device_and_grows_between_steps():
    plan = with_offload(epp_schedule(HAND_CHUNKS["hybrid"], HAND_LENGTHS, 2, list(SPLIT)), mixed_modes)
    batch = _batch()
    stages = build_stages(CFG, SPLIT, dtype=torch.float64)
    tiers = [HostTier(CPU) for _ in SPLIT]
    reference = _reference(batch, torch.float64)
    for step in range(2):
        for m in stages:
            m.zero_grad(set_to_none=True)
        loss = run_plan_local(plan, stages, batch, host_tiers=tiers, late_copies=True)
        grads = {n: p.grad for m in stages for n, p in m.named_parameters()}
        assert_matches_reference(loss, grads, *reference, TOL[torch.float64], f"step {step}")
        assert (max(t.in_use_peak for t in tiers) > 0) == (step == 1)


def test_reload_points_start_lead_actions_before_the_backward():
    acts = [Action("F", 0, 0, 0, 2), Action("F", 1, 0, 0, 1), Action("F", 2),
            Action("B", 2), Action("B", 1, 0, 0, 1, 2), Action("B", 0, 0, 0, 2, 3)]
    assert reload_points(acts) == {2: [1, 0]}


@pytest.mark.parametrize("whole, elementwise, offloaded", [(0, 0, 2), (1, 2, 4)])
def test_offloading_lowers_the_device_peak_by_what_waits_on_the_host(whole, elementwise, offloaded):
    """Five equal chunks offload (stored layers; or a checkpointed input, elementwise and stored
    layers) and a large last chunk does not. Both runs peak as the last chunk's backward begins,
    when the reload of the chunk before it has started: the device then holds four chunks' moved
    bytes fewer, and the host held all five's at the end of the forwards (within 10%, the memory
    accounting's tolerance: after other tests in the process a run's peak can differ by one of its
    tensors). A run first warms up: what a first run creates and caches is not the plan's. The loss
    runs in small blocks: its logits, formed in the last chunk's forward, would otherwise peak there,
    where every earlier chunk waits on the host."""
    lengths = [64] * 5 + [256]
    chunks = [Chunk(i, (Segment(i, 0, n),)) for i, n in enumerate(lengths)]
    g = torch.Generator().manual_seed(0)
    batch = Batch(tuple(torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in lengths))
    base = sequential_plan(chunks, lengths, [CFG.layers], {c.id: whole for c in chunks})
    run_plan_local(base, build_stages(CFG, [CFG.layers]), batch, late_copies=False, loss_block_tokens=LOSS_BLOCK)
    peaks = []
    for off in (0, offloaded):
        actions = tuple(dataclasses.replace(
            a, elementwise_layers=elementwise, offload_layers=off if a.chunk_id < 5 else 0,
            reload_lead=1 if a.kind == "B" and off and a.chunk_id < 5 else 0) for a in base.stage_actions[0])
        plan = dataclasses.replace(base, stage_actions=(actions,))
        with LiveBytesMeter(CPU) as meter:
            run_plan_local(plan, build_stages(CFG, [CFG.layers]), batch, host_tiers=[HostTier(CPU, 1 << 24)],
                           late_copies=False, loss_block_tokens=LOSS_BLOCK)
        peaks.append((meter.peak, meter.host_peak))
    (device, host), (device_offloaded, host_offloaded) = peaks
    assert host == 0 and host_offloaded > 0
    assert device - device_offloaded == pytest.approx(host_offloaded * 4 / 5, rel=0.10)


@pytest.mark.parametrize("room", [1 << 24, 0])
@pytest.mark.parametrize("whole, elementwise, offloaded", [(0, 0, 3), (1, 1, 3), (2, 0, 2), (0, 2, 1), (3, 0, 3)])
def test_a_reloaded_chunks_backward_frees_each_tensor_when_autograd_lets_it_go(whole, elementwise, offloaded, room):
    """Autograd frees a saved tensor once the node that reads it has run backward; a reloaded one
    goes then too, not when the chunk's whole backward ends (which would keep a reloaded layer's
    bytes beside every layer that backward runs after it), and so does one that stayed for want of
    host room; the hooks autograd keeps until then hold none of the chunk's metadata. So once
    reloaded, a middle stage's offloaded chunk peaks in its backward as the
    chunk kept on the device does, to the byte. The meter counts a storage the first time an
    operator returns it, a parameter's through a view too, so every parameter is viewed once
    before either run."""
    chunk = Chunk(0, (Segment(0, 0, 256),))
    batch = Batch((torch.randint(0, CFG.vocab_size, (256,), generator=torch.Generator().manual_seed(0)),))
    model = build_stages(CFG, [1, 3, 1])[1]
    x, grad = (torch.randn(256, CFG.hidden, generator=torch.Generator().manual_seed(i)) for i in (1, 2))
    peaks = []
    for off in (0, 0, offloaded):  # the first run warms up
        compute = StageCompute(model, batch, offloader=Offloader(ImmediateCopies(), HostTier(CPU, room), CPU))
        with LiveBytesMeter(CPU) as meter:
            for p in model.parameters():
                p.detach()
            compute.forward(chunk, x, whole, elementwise, off)
            compute.reload(chunk)
            meter.reset_peak()
            compute.backward(chunk, grad)
        peaks.append(meter.peak)
        model.zero_grad(set_to_none=True)
    _, kept, reloaded = peaks
    assert reloaded == kept


def test_a_storage_saved_twice_moves_once_and_weights_and_shared_tensors_stay():
    """``y`` is saved by sin and, as a view, by cos and by the linear: one storage moves, once.
    The linear's weight (saved as its transpose, a view) and a shared table stay."""
    lin = torch.nn.Linear(8, 8, bias=False)
    x = torch.randn(64, 8, requires_grad=True)
    table = torch.randn(64, 8)

    def run(hooks):
        y = x * 2
        with hooks:
            z = (y.sin() * table).sum() + y[:32].cos().sum() + lin(y[32:]).sum()
        return y, z

    _, z = run(contextlib.nullcontext())
    z.backward()
    expected = x.grad.clone(), lin.weight.grad.clone()
    x.grad = lin.weight.grad = None
    offloader = Offloader(LateCopies(0.01), HostTier(CPU, 1 << 16), CPU)
    y, z = run(offloader.saving(0, lambda: [table]))
    offloader.offload(0)
    assert offloader.moved_bytes == y.untyped_storage().nbytes()
    del y
    offloader.reload(0)
    z.backward()
    offloader.drop(0)
    offloader.finish()
    offloader.copies.close()
    assert torch.equal(x.grad, expected[0]) and torch.equal(lin.weight.grad, expected[1])
