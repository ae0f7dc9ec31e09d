"""MEASURED on one device: host offload of a split sequence's saved activations, against the
same plan without offload and against the simulator.

One process holds the whole model (one stage) and plays an EPP plan in which the longest sequence
is cut into ``--slices`` slices; the offloading run keeps the last ``--offload`` layers' saved
tensors of every slice whose backward is far enough from its forward on the host, copying each
back ``--lead`` actions ahead. It prints, each MEASURED beside what the simulator predicts:
- the pinned host link of this device (each direction alone and both at once; `--host-link-out`
  writes it for `infinipipe profile --host-link FILE`), on CUDA only;
- the step time (CUDA events on the compute stream; host clock on CPU) without and with offload;
- the allocator's peak (what the step allocates beyond the weights) and the host tier's peak;
- loss and gradients with offload against without: copies change no value, so they must be equal;
- on CUDA, the offloading step again under `torch.cuda.set_sync_debug_mode("error")`: a copy or
  wait that synchronises the device raises.
Exits non-zero when the gradients differ, a peak is off by more than ``--mem-tol`` or the sync-debug
run raises. On CPU (``--device cpu --model tiny --tokens 2048``) the host tier is a separate buffer
and the copies are the late-copy emulation's, so the script runs anywhere; its times then say
nothing about a GPU.

Usage: ``python benchmarks/gpu_offload_check.py [--model llama-7b --layers 4 --tokens 32768
--slices 8 --offload 2] [--json OUT] [--host-link-out FILE]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from infinipipe.contract.cost import CostModel, OptimizerStates, default_profile_name, load_profile
from infinipipe.contract.host import PUBLISHED_H100_HOST
from infinipipe.contract.ir import Plan, validate_plan
from infinipipe.contract.model_config import preset
from infinipipe.planners.options import PlannerOptions
from infinipipe.planners.registry import make_plan
from infinipipe.planners.request import PlanRequest
from infinipipe.runtime.batch import Batch
from infinipipe.runtime.live_bytes import LiveBytesMeter
from infinipipe.runtime.local import build_stages, run_plan_local
from infinipipe.runtime.offload import HostTier
from infinipipe.sim.simulator import simulate
from infinipipe.train.planning import check_precision

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def offloading(plan: Plan, layers: int, lead: int) -> Plan:
    """``layers`` of every chunk whose backward is at least ``lead + 1`` actions after its forward
    wait on the host, copied back ``lead`` actions ahead."""
    (actions,) = plan.stage_actions
    at = {(a.kind, a.chunk_id): i for i, a in enumerate(actions)}
    far = {c for (kind, c), i in at.items() if kind == "B" and i - at["F", c] > lead}
    out = tuple(dataclasses.replace(a, offload_layers=layers, reload_lead=lead if a.kind == "B" else 0)
                if a.chunk_id in far else a for a in actions)
    plan = dataclasses.replace(plan, stage_actions=(out,))
    validate_plan(plan)
    return plan


def timed_step(plan: Plan, stage, batch: Batch, dev: torch.device, tier: HostTier) -> tuple[float, float, int, int]:
    """Loss, seconds, device peak and host-tier peak of one step of ``plan``."""
    stage.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
    t0 = time.perf_counter()
    with LiveBytesMeter(dev) as meter:
        loss = run_plan_local(plan, [stage], batch, host_tiers=[tier])
        if dev.type == "cuda":
            end.record()
            torch.cuda.synchronize(dev)
    seconds = begin.elapsed_time(end) / 1e3 if dev.type == "cuda" else time.perf_counter() - t0
    return loss, seconds, meter.peak, getattr(meter, "host_peak", 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--layers", type=int, default=4, help="layers of the model to build (all on one stage)")
    ap.add_argument("--tokens", type=int, default=32768, help="length of the split sequence")
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--offload", type=int, default=2, help="last layers whose saved tensors wait on the host")
    ap.add_argument("--lead", type=int, default=1, help="actions ahead of its backward a copy back starts")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--mem-tol", type=float, default=0.10)
    ap.add_argument("--json", default=None)
    ap.add_argument("--host-link-out", default=None)
    args = ap.parse_args()

    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    cfg = preset(args.model).with_layers(args.layers)
    profile_name = args.profile or default_profile_name(args.model)
    profile = load_profile(profile_name)
    check_precision(profile, dt)
    report: dict = {"device": args.device, "dtype": args.dtype, "model": args.model, "layers": args.layers}
    if dev.type == "cuda":
        from infinipipe.profiling.host_copies import measure_host_link

        link = measure_host_link()
        report["host_link"] = link.to_json()
        print(f"host link MEASURED: host-to-device {link.h2d_Bps / 1e9:.1f} GB/s alone, "
              f"{link.h2d_concurrent_Bps / 1e9:.1f} GB/s beside the other direction; device-to-host "
              f"{link.d2h_Bps / 1e9:.1f} / {link.d2h_concurrent_Bps / 1e9:.1f} GB/s; latency {link.latency_s * 1e6:.1f} us")
        if args.host_link_out:
            with open(args.host_link_out, "w") as f:
                json.dump(link.to_json(), f, indent=1)
    else:
        link = profile.host_link or PUBLISHED_H100_HOST
    elem = torch.finfo(dt).bits // 8
    cost = CostModel(dataclasses.replace(profile, host_link=link), cfg,
                     OptimizerStates(param_bytes=elem, grad_bytes=elem, state_bytes=0))
    lengths = [args.tokens, *(n for n in (args.tokens // 8, args.tokens // 16) if n >= 16)]
    base = make_plan("epp", PlanRequest(lengths, cost, 1, 1e15, options=PlannerOptions(num_slices=args.slices)))
    plans = {"stored": base, "offloaded": offloading(base, min(args.offload, args.layers), args.lead)}

    g = torch.Generator().manual_seed(0)
    batch = Batch(tuple(torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lengths))
    [stage] = build_stages(cfg, [args.layers], seed=0, dtype=dt, backend="auto")
    stage.to(dev)
    tier = HostTier(dev, int(max(simulate(plans["offloaded"], cost).peak_host_bytes) * 1.25) + 2**20)
    ok, grads, rows = True, {}, {}
    for name, plan in plans.items():
        timed_step(plan, stage, batch, dev, tier)  # warm-up: kernels chosen, the tier's slab pinned
        loss, seconds, peak, host = timed_step(plan, stage, batch, dev, tier)
        sim = simulate(plan, cost)
        grads[name] = {n: p.grad.detach().clone() for n, p in stage.named_parameters()}
        ratio = peak / sim.peak_step_bytes[0]
        host_ratio = host / sim.peak_host_bytes[0] if sim.peak_host_bytes[0] else float(host == 0)
        ok &= abs(ratio - 1) <= args.mem_tol and abs(host_ratio - 1) <= args.mem_tol
        rows[name] = {"loss": loss, "step_s": seconds, "simulated_step_s": sim.iteration_time_s,
                      "peak_bytes": peak, "simulated_peak_bytes": sim.peak_step_bytes[0], "host_peak_bytes": host,
                      "simulated_host_peak_bytes": sim.peak_host_bytes[0], "offloaded_bytes": sim.offloaded_bytes[0]}
        print(f"{name}: loss {loss:.6f}; step MEASURED {seconds:.4f} s, SIMULATED {sim.iteration_time_s:.4f} s; "
              f"device peak MEASURED {peak / 2**30:.3f} GiB, SIMULATED {sim.peak_step_bytes[0] / 2**30:.3f} GiB "
              f"({ratio:.3f}); host peak MEASURED {host / 2**30:.3f} GiB, SIMULATED "
              f"{sim.peak_host_bytes[0] / 2**30:.3f} GiB")
    same = all(torch.equal(grads["stored"][n], grads["offloaded"][n]) for n in grads["stored"])
    ok &= same and rows["stored"]["loss"] == rows["offloaded"]["loss"]
    print(f"offloaded vs stored: loss and every gradient {'equal' if same else 'DIFFER'}")
    if dev.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            run_plan_local(plans["offloaded"], [stage], batch, host_tiers=[tier])
            report["sync_debug"] = "no synchronising call"
        except RuntimeError as exc:
            report["sync_debug"], ok = f"raised: {exc}", False
        finally:
            torch.cuda.set_sync_debug_mode("default")
        print(f"sync-debug mode: {report['sync_debug']}")
    print("PASS" if ok else "FAIL")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**report, "lengths": lengths, "profile": profile_name, "runs": rows, "equal": same, "pass": ok},
                      f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
