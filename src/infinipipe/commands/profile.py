"""``infinipipe profile``: fit a cost profile by measuring this device, from a measurement file,
or by scaling a measured profile to a larger model shape; or, with ``--links``, measure the links
between local processes for the cost model's SP and FSDP collectives."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..contract.model_config import PRESETS, preset


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure layer costs and fit a cost profile (--links: measure links)",
                       description=__doc__)
    p.add_argument("--model", default="tiny", help=f"model preset ({', '.join(PRESETS)})")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--from-measurements", metavar="FILE",
                     help="fit from a JSON file of measured layer costs instead of measuring")
    src.add_argument("--scale-from", metavar="PROFILE",
                     help="derive the profile by scaling a measured profile (name or file) to --model")
    src.add_argument("--from-profile", metavar="PROFILE",
                     help="start from a profile (name or file) as it is, to refit or move its memory terms")
    p.add_argument("--act-bytes-change", metavar="FILE",
                   help="move the kept bytes per token by the difference of two versions of the layer measured "
                        "on another device (benchmarks/layer_bytes.py, before/after); see docs/COST_MODEL.md")
    p.add_argument("--elementwise-from", metavar="FILE",
                   help="add elementwise-recompute terms derived from the bytes benchmarks/layer_bytes.py measured on "
                        "another device (time from the bytes it moves); see docs/COST_MODEL.md")
    p.add_argument("--elementwise-measure", action="store_true",
                   help="with --from-profile: measure the elementwise-recompute terms on this device and add them")
    p.add_argument("--memory-from", metavar="FILE",
                   help="refit the memory terms to measurements of this runtime's layer (--measurements-out of a "
                        "profile of the same model and dtype on any GPU); time terms stay")
    src.add_argument("--links", action="store_true",
                     help="measure all-to-all and all-gather between local processes and fit latency + bytes/bandwidth "
                          "(one host: intra-node links only); --out writes the links file that plan/simulate/bench "
                          "--links and cluster.links read")
    p.add_argument("--procs", type=int, default=None,
                   help="processes for --links (default: the GPUs here when more than one, else 2)")
    p.add_argument("--link-bytes", default="64KiB,1MiB,8MiB",
                   help="message sizes for --links, bytes each rank holds, comma separated (default 64KiB,1MiB,8MiB)")
    p.add_argument("--host-link", metavar="FILE|published|measure",
                   help="the pinned copies to the host that offloading plans on: a host link JSON, 'published' "
                        "(the H100 figures docs/COST_MODEL.md cites) or 'measure' (this GPU's, alone and concurrent)")
    p.add_argument("--layers", type=int, default=2, help="layers to measure (layers are identical)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="longest chunk in the grid (default 512 on cpu, 32768 on cuda)")
    p.add_argument("--min-len", type=int, default=64, help="shortest segment in the grid")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--passes", type=int, default=3, help="passes over the grid; the lowest median is kept")
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads while measuring")
    p.add_argument("--out", metavar="FILE", help="write the profile JSON here")
    p.add_argument("--measurements-out", metavar="FILE", help="also write the raw measurements (rows)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def read_host_link(spec: str):
    """``--host-link``: a file, the published figures, or this GPU measured."""
    from ..contract.host import PUBLISHED_H100_HOST, HostLink

    if spec == "published":
        return PUBLISHED_H100_HOST
    if spec == "measure":
        from ..profiling.host_copies import measure_host_link

        return measure_host_link()
    path = Path(spec)
    try:
        return HostLink.from_json(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise ValueError(f"--host-link {spec}: {exc}") from None


def run_links(args: argparse.Namespace) -> int:
    """``--links``: time the collectives, fit the links, say that one host measures only intra-node ones."""
    import torch

    from ..contract.units import parse_bytes
    from ..profiling.links import measure_links

    procs = args.procs or max(2, torch.cuda.device_count())
    sizes = [parse_bytes(word, "--link-bytes") for word in args.link_bytes.split(",")]
    links = measure_links(procs, sizes, warmup=args.warmup, reps=args.reps)
    if args.out:
        Path(args.out).write_text(json.dumps(links, indent=1) + "\n")
    if args.json:
        print(json.dumps({**links, "out": args.out}, indent=1))
        return 0
    print(f"links between {procs} local processes ({links['backend']}, {links['device']}): {links['note']}")
    for name, fit in [*links["collectives"].items(), ("intra_node (both)", links["intra_node"])]:
        print(f"  {name:18s} latency {fit['latency_s'] * 1e6:8.1f} us, bandwidth {fit['bandwidth_Bps'] * 8 / 1e9:8.2f} Gbit/s")
    if args.out:
        print(f"  wrote {args.out} (pass it to plan/simulate/bench --links, or set cluster.links)")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..contract.cost import load_profile
    from ..profiling.fit import profile_from_measurements, scale_profile

    if args.links:
        return run_links(args)
    if args.elementwise_measure and not args.from_profile:
        raise ValueError("--elementwise-measure adds terms to a profile: give it --from-profile")
    cfg = preset(args.model)
    fit_rows, held_rows = [], []
    if args.from_measurements:
        path = Path(args.from_measurements)
        try:
            measurements = json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path}: not a JSON measurements file ({exc})") from None
        prof = profile_from_measurements(measurements, args.model, cfg, path.name)
    elif args.from_profile:
        prof = load_profile(args.from_profile)
    elif args.scale_from:
        prof = scale_profile(load_profile(args.scale_from), cfg, Path(args.scale_from).stem)
    else:
        import torch

        from ..profiling.measure import profile_device

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        max_tokens = args.max_tokens or (32768 if device.startswith("cuda") else 512)
        if args.layers < 1 or args.layers > cfg.layers:
            raise ValueError(f"--layers must be in 1..{cfg.layers} for {args.model}, got {args.layers}")
        prof, fit_rows, held_rows = profile_device(
            cfg, layers=args.layers, device=device, dtype=dtype, max_tokens=max_tokens, min_len=args.min_len,
            warmup=args.warmup, reps=args.reps, passes=args.passes, threads=args.threads,
            progress=not args.no_progress,
            name=args.model)
    if args.memory_from:
        from ..profiling.fit import memory_from_measurements

        path = Path(args.memory_from)
        prof = memory_from_measurements(prof, json.loads(path.read_text()), path.name)
    if args.act_bytes_change:
        from ..profiling.fit import act_bytes_change

        path = Path(args.act_bytes_change)
        prof = act_bytes_change(prof, json.loads(path.read_text()), path.name)
    if args.elementwise_from:
        from ..profiling.fit import elementwise_derived

        path = Path(args.elementwise_from)
        prof = elementwise_derived(prof, json.loads(path.read_text()), path.name)
    if args.elementwise_measure:
        from ..profiling.measure import add_measured_elementwise

        device = args.device or "cpu"
        prof = add_measured_elementwise(prof, layers=args.layers, device=device,
                                        max_tokens=args.max_tokens or (32768 if device.startswith("cuda") else 512),
                                        min_len=args.min_len, warmup=args.warmup, reps=args.reps, passes=args.passes,
                                        threads=args.threads)
    if args.host_link:
        prof = dataclasses.replace(prof, host_link=read_host_link(args.host_link))
    if args.out:
        prof.save(args.out)
    if args.measurements_out:
        Path(args.measurements_out).write_text(json.dumps(
            {"device": prof.device, "dtype": prof.dtype, "model": args.model, "attention": prof.fit_error.get("attention"),
             "fit": [m.to_row() for m in fit_rows], "held_out": [m.to_row() for m in held_rows]}, indent=1) + "\n")
    summary = {"model": args.model, "device": prof.device, "dtype": prof.dtype, "source": prof.source,
               "derived_from": prof.derived_from, "out": args.out, "fit_error": prof.fit_error}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{args.model} on {prof.device} ({prof.dtype}): {prof.source}")
        fe = prof.fit_error
        for key in ("fwd", "bwd", "time", "act_bytes", "fwd_work_bytes", "bwd_work_bytes", "embed_time", "head_time"):
            if key in fe and fe[key].get("n"):
                method = "held-out" if "memory_from" in fe and key.endswith("bytes") else fe.get("method", "held-out")
                print(f"  {method} {key:9s} relative error: median {fe[key]['median']:.2%}, "
                      f"max {fe[key]['max']:.2%} over {fe[key]['n']} predictions")
        if args.out:
            print(f"  wrote {args.out}")
    return 0
