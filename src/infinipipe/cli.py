"""``infinipipe`` command line: subcommands are discovered from ``infinipipe.commands``."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from importlib.metadata import PackageNotFoundError, version

from . import commands

DESCRIPTION = """\
Train long-context LLMs with elastic pipeline parallelism (EPP): each step a planner splits long
sequences and packs short ones into chunks, schedules them in 1F1B pipelines and picks the layers
to recompute so every stage fits its memory.

Start with `infinipipe train` (a tiny model on this Python's standard library, 4 CPU processes,
nothing downloaded). `infinipipe COMMAND --help` describes each command."""


def _version() -> str:
    """Run from a source tree on ``PYTHONPATH`` the package has no installed metadata."""
    try:
        return version("infinipipe")
    except PackageNotFoundError:
        return "(source tree, not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infinipipe", description=DESCRIPTION, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"infinipipe {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    for command in sub.choices.values():
        command.allow_abbrev = False  # `--no-progres` is a typo to report, not a prefix to accept
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(build_parser(), argv)
    except KeyboardInterrupt:
        print("infinipipe: interrupted", file=sys.stderr)
        return 130


def _run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"infinipipe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
