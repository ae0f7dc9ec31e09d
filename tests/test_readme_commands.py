"""The README's table of commands shows every argument a command requires: a newcomer copies it."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from infinipipe.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _table_rows() -> dict[str, str]:
    """Command name -> the synopsis in the first cell of its row."""
    rows = {}
    for cell in re.findall(r"^\| `(infinipipe [^`]+)` \|", README.read_text(), re.M):
        rows[cell.split()[1]] = cell.replace("\\|", "|")
    return rows


def _required(command: argparse.ArgumentParser) -> list[list[str]]:
    """Each requirement as the option strings that meet it (one of a required group's options)."""
    needs = [a.option_strings for a in command._actions if a.required and a.option_strings]
    needs += [[s for a in g._group_actions for s in a.option_strings]
              for g in command._mutually_exclusive_groups if g.required]
    return needs


def test_every_command_row_names_the_arguments_its_command_requires():
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    rows = _table_rows()
    assert set(rows) == set(subcommands)
    missing = [(name, need) for name, synopsis in rows.items() for need in _required(subcommands[name])
               if not any(re.search(rf"{re.escape(flag)}\b", synopsis) for flag in need)]
    assert not missing, missing
