"""``infinipipe export-hf``: a training checkpoint as a Hugging Face model folder."""
from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hf", help="export a training checkpoint's weights as a Hugging Face checkpoint",
                       description="Write a run's checkpoint as a Hugging Face Llama/Qwen2 folder: config.json, "
                                   "safetensors and, where the run used one, its Hugging Face tokenizer files.")
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
        raise ValueError(f"{args.run_dir} has no checkpoint; checkpointing is on by default unless checkpoint.enable = false")
    tokenizer = Path(cfg.data.tokenizer)
    if not tokenizer.exists():
        print(f"no tokenizer copied: data.tokenizer {cfg.data.tokenizer!r} is not a Hugging Face tokenizer file",
              file=sys.stderr)
        tokenizer = None
    elif cfg.data.vocab_size:
        print(f"no tokenizer copied: data.vocab_size = {cfg.data.vocab_size} maps {cfg.data.tokenizer}'s ids onto "
              "others, which its tokenizer.json does not describe", file=sys.stderr)
        tokenizer = None
    print(export_hf(ckpt, cfg.model_config(), args.out, tokenizer))
    return 0
