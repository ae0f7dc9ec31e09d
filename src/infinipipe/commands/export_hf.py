"""``infinipipe export-hf``: a training checkpoint as a Hugging Face model folder."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hf", help="export a training checkpoint's weights as a Hugging Face checkpoint")
    p.add_argument("run_dir", help="the run's folder (its config.toml names the model)")
    p.add_argument("--checkpoint", help="a step-N folder (default: the latest checkpoint of the run)")
    p.add_argument("--out", required=True, help="folder for config.json and safetensors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..config import load_config
    from ..train.checkpoint import export_hf, latest_checkpoint

    cfg = load_config(Path(args.run_dir) / "config.toml")
    ckpt = args.checkpoint or latest_checkpoint(Path(args.run_dir) / cfg.checkpoint.folder)
    if ckpt is None:
        raise ValueError(f"{args.run_dir} has no checkpoint; train with --checkpoint.enable=true")
    print(export_hf(ckpt, cfg.model_config(), args.out))
    return 0
