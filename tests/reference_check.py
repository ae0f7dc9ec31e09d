"""Comparison of a run's loss and gradients with the full-sequence reference."""
from __future__ import annotations

import torch


def assert_matches_reference(loss, grads, ref_loss, ref_grads, tol, label=""):
    """Relative error of the loss and of every gradient tensor at most ``tol``.

    A gradient that is zero in exact arithmetic is rounding noise in both runs, so each tensor is
    judged relative to itself but never to less than a thousandth of the largest gradient.
    """
    assert abs(loss - ref_loss) <= tol * abs(ref_loss), (label, loss, ref_loss)
    assert grads.keys() == ref_grads.keys(), label
    floor = max(g.abs().max() for g in ref_grads.values()) * 1e-3
    for name, g in ref_grads.items():
        err = (grads[name] - g).abs().max() / torch.maximum(g.abs().max(), floor)
        assert err <= tol, f"{label} {name}: relative error {err:.3e}"
