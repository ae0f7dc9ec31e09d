"""The loss that forms its gradients in forward equals plain autograd through norm, head and
cross-entropy, also when several chunks share one `HeadGradients` and run backward out of order."""
import pytest
import torch
import torch.nn.functional as F

from infinipipe.model.layers import RMSNorm
from infinipipe.model.loss import IGNORE, HeadGradients, blocked_cross_entropy


def _parts(seed: int, dtype=torch.float64):
    torch.manual_seed(seed)
    norm, head = RMSNorm(16, 1e-5).to(dtype), torch.nn.Linear(16, 40, bias=False).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm, head


def _chunk(tokens: int, dtype=torch.float64):
    h = torch.randn(tokens, 16, dtype=dtype, requires_grad=True)
    labels = torch.randint(40, (tokens,))
    labels[::3] = IGNORE
    return h, labels


def _reference(norm, head, chunks, normaliser):
    loss = sum(F.cross_entropy(head(norm(h)), y, ignore_index=IGNORE, reduction="sum") for h, y in chunks) / normaliser
    return torch.autograd.grad(loss, [h for h, _ in chunks] + [norm.weight, head.weight]), loss


@pytest.mark.parametrize("block", [1, 5, 64])
def test_the_loss_and_every_gradient_equal_plain_autograd_when_chunks_share_a_sink_and_run_backward_out_of_order(block):
    norm, head = _parts(0)
    chunks = [_chunk(n) for n in (13, 7, 21)]
    want, want_loss = _reference(norm, head, chunks, normaliser=30)
    sink = HeadGradients()
    outs = [blocked_cross_entropy(h, norm, head, y, 30, block, sink) for h, y in chunks]
    assert not sink.empty
    for i in (1, 2, 0):
        outs[i].backward()
    assert sink.empty
    got = [h.grad for h, _ in chunks] + [norm.weight.grad, head.weight.grad]
    assert torch.allclose(sum(outs), want_loss, rtol=1e-12)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-14)


def test_the_backward_forms_no_logits_so_the_head_runs_one_matmul_less_per_weight():
    norm, head = _parts(1, torch.float32)
    h, labels = _chunk(32, torch.float32)
    loss = blocked_cross_entropy(h, norm, head, labels, 32, 8)
    counted = []

    class Count(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.matmul):
                counted.append(func)
            return func(*args, **(kwargs or {}))

    with Count():
        loss.backward()
    assert counted == []


def test_a_low_precision_head_accumulates_its_gradient_in_its_own_dtype():
    norm, head = _parts(2, torch.bfloat16)
    sink = HeadGradients()
    for n in (5, 9):
        h, labels = _chunk(n, torch.bfloat16)
        blocked_cross_entropy(h, norm, head, labels, 14, 4, sink)
    assert sink.head.dtype == torch.bfloat16 and sink.head.shape == head.weight.shape
