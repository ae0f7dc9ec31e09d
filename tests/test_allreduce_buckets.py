"""Gradients are all-reduced in bounded buckets, so the flat copy never holds every gradient."""
import torch

from infinipipe.runtime.executor import _buckets


def test_buckets_keep_order_and_stay_within_the_limit_unless_one_tensor_is_larger():
    tensors = [torch.zeros(n) for n in (10, 10, 30, 100, 5, 5)]
    buckets = _buckets(tensors, limit=40 * 4)
    assert [t for b in buckets for t in b] == tensors
    assert [[t.numel() for t in b] for b in buckets] == [[10, 10], [30], [100], [5, 5]]
    assert all(sum(t.numel() * 4 for t in b) <= 160 or len(b) == 1 for b in buckets)
