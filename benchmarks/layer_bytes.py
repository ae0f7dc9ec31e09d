"""MEASURED on this device: the bytes one decoder layer keeps for backward and holds for a moment,
per token, by the profiler's own accounting (`LayerBench`: saved-tensor accounting for what is
kept, `LiveBytesMeter` for the no-grad forward's and the backward's transients), and what the
layer keeps run in elementwise-recompute mode (``elementwise_saved_bytes``: how many fewer).

Each model shape runs whole sequences packed four to a chunk at two chunk sizes; a line through
the two gives each quantity's per-token and per-chunk part. Kept bytes are also printed beside
the layer's own K/V (``kv_dim`` keys and values per token), the figure a GPU profile's ``tokens``
coefficient holds. Run it on two versions of the layer to compare them; ``--json`` writes the rows
that `infinipipe profile --act-bytes-change` (two runs) and `--elementwise-from` (one) read.

Usage: ``python benchmarks/layer_bytes.py [--models llama-7b,llama-13b,llama-30b] [--dtype bfloat16]
[--tokens 64,128] [--json OUT]``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from infinipipe.contract.model_config import preset
from infinipipe.contract.shapes import ChunkShape
from infinipipe.profiling.measure import TORCH_DTYPES, LayerBench


def measure(model: str, dtype: str, tokens: tuple[int, int]) -> dict:
    cfg = preset(model)
    bench = LayerBench(cfg, layers=1, device="cpu", dtype=dtype, backend="sdpa", warmup=0, reps=1)
    rows = {}
    for n in tokens:
        shape = ChunkShape((n // 4,) * 4)
        fwd, bwd = bench.work_bytes(shape)
        kept = bench.saved_bytes(shape)
        rows[n] = {"act_bytes": kept, "fwd_work_bytes": fwd, "bwd_work_bytes": bwd,
                   "elementwise_saved_bytes": kept - bench.saved_bytes(shape, elementwise=True)}
    lo, hi = tokens
    terms = {}
    for q in ("act_bytes", "fwd_work_bytes", "bwd_work_bytes", "elementwise_saved_bytes"):
        per_token = (rows[hi][q] - rows[lo][q]) / (hi - lo)
        terms[q] = {"tokens": per_token, "chunk": rows[lo][q] - per_token * lo}
    kv = 2 * cfg.kv_dim * torch.finfo(TORCH_DTYPES[dtype]).bits // 8
    return {"model": model, "dtype": dtype, "rows": {str(n): r for n, r in rows.items()}, "terms": terms,
            "act_bytes_per_token_beside_kv": terms["act_bytes"]["tokens"] - kv}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama-7b,llama-13b,llama-30b")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(TORCH_DTYPES))
    ap.add_argument("--tokens", default="64,128", help="two chunk sizes (four sequences each)")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()
    tokens = tuple(int(x) for x in args.tokens.split(","))
    if len(tokens) != 2 or tokens[0] >= tokens[1] or min(tokens) % 4:
        ap.error("--tokens takes two increasing multiples of 4")
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"measured": "MEASURED (CPU, saved-tensor accounting and live bytes)", "commit": commit,
           "device": "cpu", "dtype": args.dtype, "torch": torch.__version__,
           "method": (f"benchmarks/layer_bytes.py: one layer, sdpa, whole sequences packed four to a chunk of "
                      f"{tokens[0]} and {tokens[1]} tokens; kept bytes by saved-tensor accounting, stored and "
                      "elementwise (LayerBench.saved_bytes), work bytes by live bytes (LayerBench.work_bytes)"),
           "shapes": [measure(m, args.dtype, tokens) for m in args.models.split(",")]}
    for s in out["shapes"]:
        t = s["terms"]
        print(f"{s['model']:10s} {s['dtype']}: kept {t['act_bytes']['tokens']:,.0f} B/token "
              f"({s['act_bytes_per_token_beside_kv']:,.0f} beside K/V); no-grad forward work "
              f"{t['fwd_work_bytes']['tokens']:,.0f} B/token + {t['fwd_work_bytes']['chunk'] / 2**20:,.1f} MiB; "
              f"backward work {t['bwd_work_bytes']['tokens']:,.0f} B/token + {t['bwd_work_bytes']['chunk'] / 2**20:,.1f} MiB")
        elem = t["act_bytes"]["tokens"] - t["elementwise_saved_bytes"]["tokens"]
        print(f"{'':10s} elementwise recompute: kept {elem:,.0f} B/token "
              f"({elem - (t['act_bytes']['tokens'] - s['act_bytes_per_token_beside_kv']):,.0f} beside K/V), "
              f"{t['elementwise_saved_bytes']['tokens']:,.0f} fewer")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
