"""A refitted profile against the committed one it must reproduce: equal up to rounding.

A least-squares refit on another NumPy/SciPy/BLAS build moves the last bits of its coefficients
(0.5403823035618479 against ...486), so equality is too strict. These checks allow rounding, and
nothing that a hand edit of a committed number, a changed feature or a changed fit would be.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import pytest

from infinipipe.contract.cost import ELEMENTWISE_TERM_NAMES, TERM_NAMES, WORK_TERM_NAMES, LinearTerm, Profile
from infinipipe.contract.shapes import ChunkShape

# A term's prediction on a shape, and each fit-error figure, relative to the committed value.
FIT_REL = 1e-9
# Fit-error figures that are rounding noise around zero (the held-out error of an exact memory fit, ~1e-16).
NOISE_ABS = 1e-12


def assert_terms_match(fresh: Profile, committed: Profile, names: Iterable[str], shapes: Sequence[ChunkShape]) -> None:
    """Each named term has the committed term's features and predicts what it predicts on every
    shape to `FIT_REL` (predictions, not coefficients: a coefficient NNLS holds at zero may come
    out as 0.0 or as rounding noise, which changes no prediction)."""
    for name in names:
        got, want = getattr(fresh, name), getattr(committed, name)
        assert (got is None) == (want is None), name
        if want is None:
            continue
        assert set(got.coef) == set(want.coef), name
        assert [got(s) for s in shapes] == pytest.approx([want(s) for s in shapes], rel=FIT_REL, abs=0), name


def assert_refit_matches(fresh: Profile, committed: Profile, shapes: Sequence[ChunkShape]) -> None:
    """Every field but the floats equal; terms as `assert_terms_match`; fit-error figures to
    `FIT_REL` or `NOISE_ABS`."""
    names = TERM_NAMES + WORK_TERM_NAMES + ELEMENTWISE_TERM_NAMES
    assert_terms_match(fresh, committed, names, shapes)
    blank = {n: LinearTerm({}) for n in names}
    assert replace(fresh, fit_error={}, **blank) == replace(committed, fit_error={}, **blank)
    _assert_close(fresh.fit_error, committed.fit_error, "fit_error")


def _assert_close(got: Any, want: Any, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), where
        for key in want:
            _assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, float):
        assert isinstance(got, float) and math.isclose(got, want, rel_tol=FIT_REL, abs_tol=NOISE_ABS), \
            f"{where}: {got} vs {want}"
    else:
        assert got == want, where
