"""Byte sizes as people write them (``80GiB``, ``40GB``, ``512MiB``): one parser for every input.

Memory budgets come from TOML files, command lines and planner options; each reads them here so
the same text means the same number everywhere.
"""
from __future__ import annotations

import re

_BYTE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_BYTES_RE = re.compile(r"^\s*(\d*\.?\d+)\s*([A-Za-z]*)\s*$")
GIB = float(2**30)
MIB = float(2**20)


def parse_bytes(value: str | int, name: str = "value", allow_zero: bool = False) -> int:
    """``"80GiB"`` -> 85899345920. Binary (KiB .. TiB) and decimal (KB .. TB) units, any case; a
    bare number is bytes. The size must be > 0 (or 0, where ``allow_zero`` says it turns a
    feature off); ``name`` says which input in the error."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a size like '80GiB', got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        m = _BYTES_RE.match(str(value))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _BYTE_UNITS:
            raise ValueError(f"{name} must be a size like '80GiB' or '512MiB', got {value!r}")
        size = int(float(m.group(1)) * _BYTE_UNITS[unit])
    if size < 0 or (size == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} bytes, got {value!r}")
    return size


def format_bytes(n: float) -> str:
    """``GiB`` with two decimals from 1 GiB up, else ``MiB``: how errors and tables print sizes."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"
