"""Loading a run configuration: TOML file, then ``--section.key=value`` overrides, then validation.

Parsing lives here and the sections' meaning in `schema`, as torchtitan splits its job config
from its config manager. Every key is checked against its section's dataclass
(`build_typed`), so a typo is an error naming ``section.key``, never a silent default.
"""
from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..contract.typed_fields import allowed_types, build_typed, coerce, field_hints, unknown_name
from .schema import Config


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]


def _build(raw: dict[str, Any]) -> Config:
    sections = _sections()
    built = {}
    for section, values in raw.items():
        if section not in sections:
            raise unknown_name("section", section, list(sections))
        if not isinstance(values, dict):
            raise ValueError(f"[{section}] must be a table of keys, got {type(values).__name__}")
        built[section] = build_typed(sections[section], values, f"{section}.")
    return Config(**built)


def _override(raw: dict[str, Any], item: str) -> None:
    """Apply ``section.key=value``; the value is read as TOML, or as a bare string for str keys."""
    text = item[2:] if item.startswith("--") else item
    dotted, sep, value = text.partition("=")
    section, dot, key = dotted.strip().partition(".")
    if not sep or not dot or not key:
        raise ValueError(f"override {item!r} must look like --section.key=value")
    sections = _sections()
    if section not in sections:
        raise unknown_name("section", section, list(sections))
    hints = field_hints(sections[section])
    if key not in hints:
        raise unknown_name("key", f"{section}.{key}", list(hints))
    value = value.strip()
    if str in allowed_types(hints[key]):
        parsed: Any = value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'" else value
    else:
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
    coerce(f"{section}.{key}", parsed, hints[key])  # now, so a later override cannot hide a bad one
    raw.setdefault(section, {})[key] = parsed


def collect_overrides(argv: list[str]) -> list[str]:
    """Turn leftover CLI words (``--training.steps=5`` or ``--training.steps 5``) into overrides."""
    out, i = [], 0
    while i < len(argv):
        word = argv[i]
        if not word.startswith("--") or "." not in word.split("=", 1)[0]:
            raise ValueError(f"unrecognised argument {word!r}; config overrides look like --section.key=value")
        if "=" not in word:
            if i + 1 >= len(argv):
                raise ValueError(f"override {word!r} has no value")
            word, i = f"{word}={argv[i + 1]}", i + 1
        out.append(word)
        i += 1
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML file (or start from the embedded defaults), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} not found")
        with path.open("rb") as f:
            try:
                raw = tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"{path}: invalid TOML: {exc}") from None
    for item in overrides:
        _override(raw, item)
    return _build(raw)


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` with overrides applied (e.g. a saved run config plus ``--training.steps=...``)."""
    raw: dict[str, Any] = cfg.to_dict()
    for item in overrides:
        _override(raw, item)
    return _build(raw)
