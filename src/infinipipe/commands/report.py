"""``infinipipe report RUN_DIR``: loss curve and throughput over steps, as a PNG."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="draw the loss curve and throughput of a training run")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default RUN_DIR/report.png)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.report import draw_report

    print(draw_report(args.run_dir, args.out))
    return 0
