"""``infinipipe export-hf``: a training checkpoint as a Hugging Face model folder."""
from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hf", help="export a training checkpoint's weights as a Hugging Face checkpoint",
                       description="Write a run's checkpoint as a Hugging Face Llama/Qwen2 folder: config.json, "
                                   "safetensors and, where the run used one, its Hugging Face tokenizer files. "
                                   "The checkpoint's files are checked against its manifest first.")
    p.add_argument("run_dir", help="the run's folder (the checkpoint's config.toml, or the run's, names the model)")
    p.add_argument("--checkpoint", help="a step-N folder (default: the newest intact checkpoint of the run)")
    p.add_argument("--out", required=True, help="folder for config.json and safetensors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..config import load_config
    from ..train.checkpoint import CONFIG, CheckpointError, checkpoint_problems, export_hf, intact_checkpoint

    run_cfg = load_config(Path(args.run_dir) / "config.toml")
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        if problems := checkpoint_problems(ckpt):
            raise CheckpointError(f"checkpoint {ckpt} is damaged: {'; '.join(problems)}")
    else:
        folder = Path(args.run_dir) / run_cfg.checkpoint.folder
        ckpt = intact_checkpoint(folder)
        if ckpt is None:
            raise ValueError(f"{args.run_dir} has no intact checkpoint in {folder}; checkpointing is on by default "
                             "unless checkpoint.enable = false")
    # The run directory's config follows the newest job, which may have trained another model.
    cfg = load_config(ckpt / CONFIG) if (ckpt / CONFIG).is_file() else run_cfg
    tokenizer = Path(cfg.data.tokenizer)
    if not tokenizer.exists():
        print(f"no tokenizer copied: data.tokenizer {cfg.data.tokenizer!r} is not a Hugging Face tokenizer file",
              file=sys.stderr)
        tokenizer = None
    elif cfg.data.vocab_size:
        print(f"no tokenizer copied: data.vocab_size = {cfg.data.vocab_size} maps {cfg.data.tokenizer}'s ids onto "
              "others, which its tokenizer.json does not describe", file=sys.stderr)
        tokenizer = None
    out = export_hf(ckpt, cfg.model_config(), args.out, tokenizer)
    print(f"exported {ckpt.name} ({ckpt}) to {out}")
    return 0
