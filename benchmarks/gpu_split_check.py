"""MEASURED on one device: a split sequence's plan, its allocator peak against the simulator's
prediction, and its bf16 loss and gradients against an fp32 full-sequence reference.

One process holds the whole model (one stage) and plays an EPP plan in which the longest sequence
is cut into ``--slices`` slices attending to its K/V store (varlen flash attention on CUDA in
bf16), once storing every layer and once recomputing every layer. The peak is what the step
allocates beyond the weights (`LiveBytesMeter`: the CUDA allocator, or a storage count on CPU);
the prediction is `SimResult.peak_step_bytes` from ``--profile`` (default: the committed profile
of ``--model``). Then the same weights in fp32 run the plain full-sequence reference and each
gradient's relative error (norm of the difference over the reference's norm) is printed beside
that of the plain full-sequence run in the same dtype. Exits non-zero when the peak is off by more
than ``--mem-tol``, the loss by more than ``--grad-tol``, or a gradient's error exceeds twice the
plain run's.

Usage: ``python benchmarks/gpu_split_check.py [--model llama-7b --layers 4 --tokens 32768
--slices 8] [--profile FILE] [--json OUT]``; on CPU, ``--device cpu --model tiny --tokens 2048``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys

import torch

from infinipipe.contract.cost import CostModel, OptimizerStates, default_profile_name, load_profile
from infinipipe.contract.ir import Plan
from infinipipe.contract.model_config import preset
from infinipipe.contract.shapes import ChunkShape
from infinipipe.model.attention import resolve_backend
from infinipipe.planners.options import PlannerOptions
from infinipipe.planners.registry import make_plan
from infinipipe.planners.request import PlanRequest
from infinipipe.runtime.batch import Batch
from infinipipe.runtime.full_sequence import reference_loss
from infinipipe.runtime.live_bytes import LiveBytesMeter
from infinipipe.runtime.local import build_stages, run_plan_local
from infinipipe.sim.simulator import simulate
from infinipipe.train.planning import check_precision

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def with_recompute(plan: Plan, layers: int) -> Plan:
    actions = tuple(tuple(a.with_mode(layers) for a in acts) for acts in plan.stage_actions)
    return dataclasses.replace(plan, stage_actions=actions)


def relative_errors(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor: norm of the difference over the reference's norm."""
    return {n: float((grads[n].float() - g).norm() / g.norm().clamp_min(1e-30)) for n, g in ref.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--layers", type=int, default=4, help="layers of the model to build (all on one stage)")
    ap.add_argument("--tokens", type=int, default=32768, help="length of the split sequence")
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--mem-tol", type=float, default=0.10)
    ap.add_argument("--grad-tol", type=float, default=0.05)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    cfg = preset(args.model).with_layers(args.layers)
    profile_name = args.profile or default_profile_name(args.model)
    profile = load_profile(profile_name)
    check_precision(profile, dt)
    elem = torch.finfo(dt).bits // 8
    # The stage holds dtype weights and accumulates dtype gradients; no optimizer state here.
    cost = CostModel(profile, cfg, OptimizerStates(param_bytes=elem, grad_bytes=elem, state_bytes=0))
    shorts = [n for n in (args.tokens // 8, args.tokens // 16, args.tokens // 32, args.tokens // 64) if n >= 16]
    lengths = [args.tokens, *shorts]
    base = make_plan("epp", PlanRequest(lengths, cost, 1, 1e15, options=PlannerOptions(num_slices=args.slices)))
    slices = sum(1 for c in base.chunks if any(s.seq_id == 0 for s in c.segments))
    backend = resolve_backend("auto", dev, dt)
    print(f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{args.dtype}, attention {backend}; {args.model} with {args.layers} layers; profile {profile_name} "
          f"({profile.device}, {profile.dtype})")
    print(f"batch {lengths}: the {args.tokens}-token sequence in {slices} slices, "
          f"{len(base.chunks)} chunks; shapes {[ChunkShape.of(c, lengths).seg_lens for c in base.chunks]}")

    g = torch.Generator().manual_seed(0)
    batch = Batch(tuple(torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lengths))
    [stage] = build_stages(cfg, [args.layers], seed=0, dtype=dt, backend="auto")
    stage.to(dev)
    rows, ok = [], True
    grads = None
    for rec in (0, args.layers):
        plan = with_recompute(base, rec)
        stage.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        with LiveBytesMeter(dev) as meter:
            loss = run_plan_local(plan, [stage], batch)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        predicted = simulate(plan, cost).peak_step_bytes[0]
        ratio = meter.peak / predicted
        ok &= abs(ratio - 1) <= args.mem_tol
        rows.append({"recompute_layers": rec, "loss": loss, "measured_peak_bytes": meter.peak,
                     "predicted_peak_bytes": predicted, "measured_over_predicted": ratio})
        print(f"recompute {rec}/{args.layers} layers: loss {loss:.6f}; peak MEASURED {meter.peak / 2**30:.3f} GiB, "
              f"SIMULATED {predicted / 2**30:.3f} GiB, ratio {ratio:.3f}")
        if rec == 0:
            grads = {n: p.grad.detach().clone() for n, p in stage.named_parameters()}

    on_device = Batch(tuple(t.to(dev) for t in batch.sequences))
    stage.zero_grad(set_to_none=True)
    reference_loss(stage, on_device).backward()
    plain = {n: p.grad.detach().clone() for n, p in stage.named_parameters()}
    stage.cpu()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    [ref] = build_stages(cfg, [args.layers], seed=0, dtype=torch.float32, backend="sdpa")
    ref.to(dev)
    ref_loss = reference_loss(ref, on_device)
    ref_loss.backward()
    ref_loss = ref_loss.item()
    ref_grads = {n: p.grad.detach() for n, p in ref.named_parameters()}
    errs = relative_errors({n: t.to(dev) for n, t in grads.items()}, ref_grads)
    floor = relative_errors({n: t.to(dev) for n, t in plain.items()}, ref_grads)
    loss_err = abs(rows[0]["loss"] - ref_loss) / abs(ref_loss)
    worst = max(errs, key=lambda n: errs[n] / max(floor[n], 1e-12))
    # The plan may lose no more than the precision itself does: the plain full-sequence run in the
    # same dtype is the yardstick (twice its error, as flash-attention's own tests judge).
    ok &= loss_err <= args.grad_tol and all(errs[n] <= 2 * floor[n] + 1e-6 for n in errs)
    print(f"{args.dtype} plan vs fp32 full-sequence reference: loss {rows[0]['loss']:.6f} vs {ref_loss:.6f} "
          f"(relative {loss_err:.2e}); gradient relative error median {statistics.median(errs.values()):.2e}, "
          f"max {max(errs.values()):.2e}; the plain {args.dtype} full-sequence run: median "
          f"{statistics.median(floor.values()):.2e}, max {max(floor.values()):.2e}; worst ratio "
          f"{errs[worst] / max(floor[worst], 1e-12):.2f} ({worst})")
    print("PASS" if ok else "FAIL")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "dtype": args.dtype, "attention": backend, "model": args.model,
                       "layers": args.layers, "lengths": lengths, "slices": slices, "profile": profile_name,
                       "runs": rows, "loss_relative_error": loss_err, "grad_relative_errors": errs,
                       "plain_grad_relative_errors": floor, "pass": ok},
                      f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
