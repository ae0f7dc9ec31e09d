"""Plain values (TOML tables, ``key=value`` words) into typed dataclasses, every key checked.

A typo that silently falls back to a default wastes a GPU run, so an unknown key or a value of the
wrong type is a ``ValueError`` that names the key (and its section) and suggests the closest name.
"""
from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar, Union

T = TypeVar("T")


def allowed_types(hint: Any) -> tuple[type, ...]:
    """The types a field accepts (``int | None`` accepts ``int``; ``None`` is "leave it out")."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return tuple(t for t in typing.get_args(hint) if t is not type(None))
    return (hint,)


def coerce(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's type; ints are accepted where a float is expected."""
    allowed = allowed_types(hint)
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif isinstance(value, int) and int in allowed:
        return value
    elif isinstance(value, (int, float)) and float in allowed:
        return float(value)
    elif isinstance(value, str) and str in allowed:
        return value
    want = " or ".join(t.__name__ for t in allowed)
    raise ValueError(f"{name} must be {want}, got {type(value).__name__} {value!r}")


def unknown_name(kind: str, name: str, known: list[str]) -> ValueError:
    """``unknown key 'epp.max_slice' (did you mean 'epp.max_slices'?)``: the hint keeps the section."""
    head, _, last = name.rpartition(".")
    close = difflib.get_close_matches(last, known, n=1)
    hint = f" (did you mean {(head + '.' if head else '') + close[0]!r}?)" if close else ""
    return ValueError(f"unknown {kind} {name!r}{hint}")


def field_hints(cls: type) -> dict[str, Any]:
    """Field name -> type hint of a dataclass (class variables left out)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def build_typed(cls: type[T], values: Mapping[str, Any], where: str = "") -> T:
    """``cls(**values)`` after checking every key and type; ``where`` prefixes names in errors
    (``"epp."`` for a config section)."""
    hints = field_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise unknown_name("key", f"{where}{key}", list(hints))
        kwargs[key] = coerce(f"{where}{key}", value, hints[key])
    return cls(**kwargs)
