"""``infinipipe cost``: time and memory of one chunk on one stage, predicted from a profile."""
from __future__ import annotations

import argparse
import json


def _segments(text: str) -> tuple[int, ...]:
    try:
        segs = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--segments must be comma-separated integers, got {text!r}") from None
    if not segs or min(segs) < 1:
        raise argparse.ArgumentTypeError(f"--segments needs positive lengths, got {text!r}")
    return segs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cost", help="predict a chunk's time and memory on a stage", description=__doc__)
    p.add_argument("--profile", required=True, help="profile JSON file or committed profile name")
    p.add_argument("--layers", type=int, required=True, help="decoder layers on the stage")
    p.add_argument("--segments", type=_segments, required=True, help="segment lengths, e.g. 4096,1024,512")
    p.add_argument("--prefix", type=int, default=0, help="cached prefix of the first segment")
    p.add_argument("--kept", type=int, default=0,
                   help="tokens of the first segment whose K/V stay for later slices (a split slice)")
    p.add_argument("--recompute", type=int, default=0, help="checkpointed layers among --layers")
    p.add_argument("--elementwise", type=int, default=0,
                   help="layers among the others that recompute only their norms' outputs and SwiGLU product")
    p.add_argument("--first", action="store_true", help="stage holds the embedding")
    p.add_argument("--last", action="store_true", help="stage holds final norm, LM head and loss")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..contract.cost import CostModel, load_profile
    from ..contract.shapes import ChunkShape

    if args.layers < 1:
        raise ValueError(f"--layers must be >= 1, got {args.layers}")
    if not 0 <= args.recompute <= args.layers:
        raise ValueError(f"--recompute must be in 0..{args.layers}, got {args.recompute}")
    if not 0 <= args.elementwise <= args.layers - args.recompute:
        raise ValueError(f"--elementwise must be in 0..{args.layers - args.recompute} (the layers not recomputed), "
                         f"got {args.elementwise}")
    profile = load_profile(args.profile)
    model = CostModel(profile, profile.model.with_layers(max(args.layers, profile.model.layers)))
    shape = ChunkShape(args.segments, prefix=args.prefix, kept=args.kept)
    model.check_range(shape)
    n, r, e = args.layers, args.recompute, args.elementwise
    out = {
        "forward_ms": model.forward_ms(shape, n, first=args.first, last=args.last),
        "backward_ms": model.backward_ms(shape, n, first=args.first, last=args.last),
        "recompute_ms": model.recompute_ms(shape, r, e),
        "activation_bytes": model.activation_bytes(shape, n, recompute=r, first=args.first, last=args.last,
                                                   elementwise=e),
        "kv_bytes": model.kv_bytes(shape, n),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"chunk {list(shape.seg_lens)} prefix {shape.prefix} on {n} layer(s) ({r} recomputed, {e} elementwise), "
              f"{profile.device} {profile.dtype}:")
        for k, v in out.items():
            print(f"  {k:17s} {v / 2**20:12.1f} MiB" if k.endswith("bytes") else f"  {k:17s} {v:12.3f}")
    return 0
