"""``infinipipe report RUN_DIR``: a run's loss, throughput and bubble ratio over steps, as a PNG.

Throughput and bubble ratio are drawn as measured beside the simulator's prediction for the same
plans, so the chart shows how far the cost model is from the machine.
"""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="draw a run's loss, throughput and bubble ratio (measured vs predicted)",
                       description=__doc__)
    p.add_argument("run_dir", help="the run's folder (its metrics.jsonl and config.toml)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/report.png)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.report import draw_report

    print(draw_report(args.run_dir, args.out))
    return 0
