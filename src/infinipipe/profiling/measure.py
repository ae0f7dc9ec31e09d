"""Measure decoder layers of a model shape on this device and fit a cost profile.

Layers are identical, so a few of them stand for the whole model. Each chunk shape runs forward
and backward after warm-up; times are medians (CUDA events on GPU; on CPU the measuring thread's
CPU time when it is the only intra-op thread, else a wall clock), and the bytes kept for backward
come from saved-tensor accounting (plus allocator growth on GPU, recorded for comparison). The fit
uses one grid of shapes and its error is judged on a second grid of different packings and
prefixes that the fit never saw. A layer's transient work memory (its no-grad forward, its
backward) is counted by `LiveBytesMeter`: every allocation on CPU, the allocator on GPU.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..contract.cost import LinearTerm, Profile
from ..contract.ir import Chunk, Segment
from ..contract.model_config import ModelConfig
from ..contract.shapes import ChunkShape
from ..model.attention import resolve_backend
from ..model.kv_store import LayerKV
from ..model.layers import ChunkMeta, DecoderLayer, RMSNorm, rms_normalised, swiglu_product
from ..model.loss import blocked_cross_entropy
from ..model.stage import StageModel
from ..runtime.batch import Batch
from ..runtime.live_bytes import LiveBytesMeter
from ..runtime.memory import SavedTensorMeter
from ..runtime.stage_compute import StageCompute
from .fit import (
    ERROR_MIN_TOKENS,
    MEM_FEATURES_FLASH,
    MEM_FEATURES_SDPA,
    TIME_FEATURES_FLASH,
    TIME_FEATURES_SDPA,
    Measurement,
    fit_elementwise,
    fit_layer,
    fit_term,
    loss_work_term,
    relative_errors,
    summarize,
)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _pow2_upto(lo: int, hi: int) -> list[int]:
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n *= 2
    return out


def fit_grid(max_tokens: int, min_len: int = 64) -> list[ChunkShape]:
    """Shapes plans produce, on powers of two: whole sequences, packed groups of short ones,
    slices attending to long cached prefixes, and hybrid chunks (a slice plus whole shorts)."""
    lens = _pow2_upto(min_len, max_tokens)
    shapes = [ChunkShape((n,)) for n in lens]
    shapes += [ChunkShape((n,) * k) for n in lens for k in (2, 4, 8, 16) if 4 * min_len <= n * k <= max_tokens]
    shapes += [ChunkShape((s,), prefix=c)
               for s in lens for c in lens if s <= max_tokens // 2 and c + s <= 2 * max_tokens]
    shapes += [ChunkShape((s, min_len, min_len), prefix=c)
               for s in lens for c in lens if s + 2 * min_len <= max_tokens and c >= s and c + s <= 2 * max_tokens]
    return list(dict.fromkeys(shapes))


def held_out_grid(max_tokens: int, min_len: int = 64) -> list[ChunkShape]:
    """Shapes off the fit grid: lengths between its powers of two, mixed packings, odd prefixes."""
    lens = sorted({n * k // 4 for n in _pow2_upto(min_len, max_tokens) for k in (5, 6, 7)
                   if n * k // 4 <= max_tokens})
    shapes = [ChunkShape((n,)) for n in lens]
    shapes += [ChunkShape((n, n // 2, n // 4)) for n in lens if n * 7 // 4 <= max_tokens and n // 4 >= 16]
    shapes += [ChunkShape((n,), prefix=3 * n) for n in lens if 4 * n <= 2 * max_tokens]
    shapes += [ChunkShape((n, n // 3), prefix=n // 2) for n in lens if n * 4 // 3 <= max_tokens]
    return list(dict.fromkeys(shapes))


@dataclass
class LayerBench:
    """A stack of decoder layers on one device and dtype, ready to run chunk shapes."""

    cfg: ModelConfig
    layers: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    backend: str = "auto"
    warmup: int = 2
    reps: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(TORCH_DTYPES)}")
        if self.layers < 1 or self.warmup < 0 or self.reps < 1:
            raise ValueError(f"need layers >= 1, warmup >= 0, reps >= 1 "
                             f"(got {self.layers}, {self.warmup}, {self.reps})")
        torch.manual_seed(self.seed)
        self._dev = torch.device(self.device)
        self._dt = TORCH_DTYPES[self.dtype]
        self.stack = torch.nn.ModuleList(DecoderLayer(self.cfg, self.backend) for _ in range(self.layers))
        self.stack.to(device=self._dev, dtype=self._dt)
        self._cache: dict[ChunkShape, tuple] = {}

    @property
    def cuda(self) -> bool:
        return self._dev.type == "cuda"

    def _inputs(self, shape: ChunkShape):
        split = 0 if shape.prefix else None
        meta = ChunkMeta.build(shape.seg_lens, (shape.prefix,) + (0,) * (len(shape.seg_lens) - 1), self._dev, split)
        h = torch.randn(shape.tokens, self.cfg.hidden, device=self._dev, dtype=self._dt, requires_grad=True)
        kv = [self._prefix_kv(shape.prefix, shape.seg_lens[0]) if shape.prefix else None for _ in range(self.layers)]
        return meta, h, kv

    def _prefix_kv(self, c: int, s: int) -> LayerKV:
        """A split sequence's K/V store with a cached prefix of ``c`` tokens, as the runtime keeps it
        once the sequence's backward has begun (its dK/dV, which the cost model charges apart, exist
        before any measurement starts)."""
        store = LayerKV(c + s, self.cfg.kv_heads, self.cfg.head_dim, self._dt, self._dev)
        store.gradients()
        store.k[:c].normal_()
        store.v[:c].normal_()
        store.filled = c
        return store

    def _forward(self, meta, h, kv, elementwise: bool = False) -> torch.Tensor:
        for layer, store in zip(self.stack, kv):
            h = layer(h, meta, store, elementwise=elementwise)
        return h

    def time_once(self, shape: ChunkShape) -> tuple[float, float]:
        """Milliseconds of one forward and one backward of the stack for ``shape``."""
        if shape not in self._cache:
            meta, h, kv = self._inputs(shape)
            self._cache[shape] = (meta, h, kv, torch.randn_like(h))
        meta, h, kv, grad = self._cache[shape]
        clock = _stopwatch(self._dev)
        if self.cuda:
            torch.cuda.synchronize()
        stop = clock()
        out = self._forward(meta, h, kv)
        f = stop()
        stop = clock()
        out.backward(grad)
        b = stop()
        self.stack.zero_grad(set_to_none=True)
        h.grad = None
        return f, b

    def saved_bytes(self, shape: ChunkShape, elementwise: bool = False) -> int:
        """Bytes of unique storages the stack's forward keeps for backward (parameters excluded),
        its layers run in elementwise-recompute mode or not."""
        meta, h, kv = self._inputs(shape)
        meter = SavedTensorMeter(exclude=list(self.stack.parameters()))
        with meter:
            out = self._forward(meta, h, kv, elementwise)
        saved = meter.current
        del out
        return saved

    def work_bytes(self, shape: ChunkShape) -> tuple[int, int]:
        """Transient bytes of one layer: its forward when nothing is kept (a checkpointed layer's
        first pass), and its backward beyond the activations it holds when backward starts.
        Weight gradients exist before (they accumulate over a step's chunks) and are not counted."""
        meta, h, kv = self._inputs(shape)
        layer, grad = self.stack[0], torch.randn_like(h)
        with LiveBytesMeter(self._dev) as meter, torch.no_grad():
            layer(h, meta, kv[0])
            fwd = meter.peak
        layer(h, meta, kv[0]).backward(grad)
        meta, h, kv = self._inputs(shape)
        with LiveBytesMeter(self._dev) as meter:
            out = layer(h, meta, kv[0])
            held = meter.current
            meter.reset_peak()
            out.backward(grad)
            bwd = meter.peak - held
        self.stack.zero_grad(set_to_none=True)
        return fwd, bwd

    def measure(self, shapes: Sequence[ChunkShape], passes: int = 2, progress: bool = False,
                desc: str = "") -> list[Measurement]:
        """Per-layer times and bytes for every shape. Each pass runs each shape ``warmup + reps``
        times in a row and takes the median; the lowest median over the passes is kept, so that a
        period of load from other processes on a shared machine spoils at most one pass."""
        if passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes}")
        best: dict[ChunkShape, list[float]] = {}
        runs = [(p, s) for p in range(passes) for s in shapes]
        for _, shape in tqdm(runs, desc=desc, unit="shape", disable=not progress):
            done = [self.time_once(shape) for _ in range(self.warmup + self.reps)][self.warmup:]
            med = [statistics.median(f for f, _ in done), statistics.median(b for _, b in done)]
            best[shape] = [min(x, y) for x, y in zip(best.get(shape, med), med)]
            self._cache.pop(shape)
        n = self.layers
        return [Measurement(s, best[s][0] / n, best[s][1] / n, self.saved_bytes(s) / n, *self.work_bytes(s))
                for s in shapes]

    def elementwise_once(self, shape: ChunkShape) -> float:
        """Milliseconds of what an elementwise-recompute layer's backward computes beyond a stored
        layer's: the two norms' outputs and the SwiGLU product (everything else it runs alike)."""
        t, cfg = shape.tokens, self.cfg
        if shape not in self._cache:
            x = torch.randn(2, t, cfg.hidden, device=self._dev, dtype=self._dt)
            rstd = torch.rand(2, t, 1, device=self._dev, dtype=torch.float32 if self._dt != torch.float64 else self._dt)
            gate_up = torch.randn(t, 2 * cfg.ffn, device=self._dev, dtype=self._dt)
            self._cache[shape] = (x, rstd, torch.ones(cfg.hidden, device=self._dev, dtype=self._dt), gate_up)
        x, rstd, weight, gate_up = self._cache[shape]
        clock = _stopwatch(self._dev)
        if self.cuda:
            torch.cuda.synchronize()
        stop = clock()
        for i in range(2):
            rms_normalised(x[i], weight, rstd[i])
        swiglu_product(gate_up)
        return stop()

    def measure_elementwise(self, shapes: Sequence[ChunkShape], passes: int = 2) -> list[tuple[float, float]]:
        """Per shape and layer, the bytes an elementwise-recompute layer keeps fewer than a stored
        one (saved-tensor accounting of both) and the milliseconds its recompute takes (lowest
        median over ``passes``, as `measure`)."""
        best: dict[ChunkShape, float] = {}
        for _ in range(passes):
            for shape in shapes:
                med = statistics.median([self.elementwise_once(shape) for _ in range(self.warmup + self.reps)][self.warmup:])
                best[shape] = min(best.get(shape, med), med)
                self._cache.pop(shape)
        return [((self.saved_bytes(s) - self.saved_bytes(s, elementwise=True)) / self.layers, best[s]) for s in shapes]

    def allocator_bytes(self, shape: ChunkShape) -> int:
        """CUDA allocator growth over a forward (per layer): kept tensors plus the output; reported
        next to the saved-tensor count so the two ways of measuring can be compared."""
        if not self.cuda:
            raise ValueError("allocator accounting needs a CUDA device")
        meta, h, kv = self._inputs(shape)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(self._dev)
        out = self._forward(meta, h, kv)
        torch.cuda.synchronize()
        grown = torch.cuda.memory_allocated(self._dev) - before
        del out
        return grown // self.layers


def _cpu_now() -> Callable[[], float]:
    """With one intra-op thread all work runs on the calling thread, and its CPU time leaves out
    the time other processes hold the cores; with more threads only wall time is meaningful."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def _stopwatch(device: torch.device) -> Callable[[], Callable[[], float]]:
    """A start function whose result, called, gives milliseconds since start (CUDA events on GPU)."""
    if device.type == "cuda":
        def start():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()

            def stop():
                b.record()
                torch.cuda.synchronize()
                return a.elapsed_time(b)
            return stop
        return start

    now = _cpu_now()

    def start_cpu():
        t0 = now()
        return lambda: (now() - t0) * 1e3
    return start_cpu


EDGE_PARTS = ("embed_fwd", "embed_bwd", "head_fwd", "head_bwd")


def measure_edges(cfg: ModelConfig, device: str, dtype: str, tokens: Sequence[int], warmup: int, reps: int,
                  seed: int = 0) -> dict[int, dict[str, float]]:
    """Median milliseconds of the first stage's embedding and the last stage's final norm, LM head
    and blocked loss, forward and backward, per token count. Weight gradients accumulate across
    runs, as they do over every chunk of an iteration but the first."""
    dev, dt = torch.device(device), TORCH_DTYPES[dtype]
    torch.manual_seed(seed)
    embed = torch.nn.Embedding(cfg.vocab_size, cfg.hidden).to(dev, dt)
    norm = RMSNorm(cfg.hidden, cfg.norm_eps).to(dev, dt)
    head = torch.nn.Linear(cfg.hidden, cfg.vocab_size, bias=False).to(dev, dt)
    clock = _stopwatch(dev)
    out = {}
    for n in tokens:
        ids = torch.randint(cfg.vocab_size, (n,), device=dev)
        labels = torch.randint(cfg.vocab_size, (n,), device=dev)
        h = torch.randn(n, cfg.hidden, device=dev, dtype=dt, requires_grad=True)
        grad = torch.randn(n, cfg.hidden, device=dev, dtype=dt)
        runs = []
        for i in range(warmup + reps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            stop = clock()
            e = embed(ids)
            ef = stop()
            stop = clock()
            e.backward(grad)
            eb = stop()
            stop = clock()
            loss = blocked_cross_entropy(h, norm, head, labels, n)
            hf = stop()
            stop = clock()
            loss.backward()
            hb = stop()
            h.grad = None
            if i >= warmup:
                runs.append((ef, eb, hf, hb))
        out[n] = {part: statistics.median(r[k] for r in runs) for k, part in enumerate(EDGE_PARTS)}
    return out


OVERHEAD_SHAPES = ((64,), (128,), (256,), (64, 64, 64, 64))


def measure_action_overhead(cfg: ModelConfig, device: str, dtype: str, layer_fwd: LinearTerm, layer_bwd: LinearTerm,
                            warmup: int = 3, reps: int = 20, seed: int = 0) -> tuple[float, float]:
    """Milliseconds the runtime adds to a chunk's forward and backward on a stage, beyond its
    layers: chunk metadata, the checkpoint wrapper, detaching and handing on the output. The
    median, over small packed chunks where it matters most, of a one-layer middle stage's action
    time (as `StageCompute` runs it, recomputing its layer every other time) less the fitted layer
    time (and, when recomputing, one more layer forward)."""
    dev, dt = torch.device(device), TORCH_DTYPES[dtype]
    torch.manual_seed(seed)
    model = StageModel(cfg, range(0, 1), first=False, last=False).to(dev, dt)
    clock = _stopwatch(dev)
    fwd, bwd = [], []
    for seg_lens in OVERHEAD_SHAPES:
        batch = Batch.of([[1] * n for n in seg_lens])
        chunk = Chunk(0, tuple(Segment(i, 0, n) for i, n in enumerate(seg_lens)))
        shape = ChunkShape(seg_lens)
        x = torch.randn(shape.tokens, cfg.hidden, device=dev, dtype=dt)
        for i in range(warmup + reps):
            compute = StageCompute(model, batch)
            stop = clock()
            out = compute.forward(chunk, x, recompute_layers=i % 2)
            f = stop()
            grad = torch.ones_like(out)
            stop = clock()
            compute.backward(chunk, grad)
            b = stop()
            model.zero_grad(set_to_none=True)
            if i >= warmup:
                fwd.append(f - layer_fwd(shape))
                bwd.append(b - layer_bwd(shape) - (layer_fwd(shape) if i % 2 else 0.0))
    return max(statistics.median(fwd), 0.0), max(statistics.median(bwd), 0.0)


def elementwise_profile_terms(bench: LayerBench, fit_shapes: Sequence[ChunkShape], held_out: Sequence[ChunkShape],
                              passes: int) -> tuple[dict[str, LinearTerm], dict[str, Any]]:
    """The elementwise-recompute terms, fitted on the grid's whole sequences and judged on the
    held-out grid's: what it recomputes is per token, whatever the chunk's packing or prefix."""
    fit = [s for s in fit_shapes if len(s.seg_lens) == 1 and not s.prefix]
    held = [s for s in held_out if len(s.seg_lens) == 1 and not s.prefix]
    rows = bench.measure_elementwise(fit + held, passes)
    return fit_elementwise(dict(zip(fit, rows[:len(fit)])), dict(zip(held, rows[len(fit):])))


def add_measured_elementwise(base: Profile, *, layers: int = 1, device: str = "cpu", max_tokens: int = 1024,
                             min_len: int = 64, warmup: int = 2, reps: int = 5, passes: int = 3,
                             threads: int = 1) -> Profile:
    """``base`` with elementwise-recompute terms measured on this device, its other terms as they are
    (a profile measured before the terms existed, on this kind of device)."""
    saved_threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(threads)
    try:
        bench = LayerBench(base.model, layers=layers, device=device, dtype=base.dtype, warmup=warmup, reps=reps)
        terms, errors = elementwise_profile_terms(bench, fit_grid(max_tokens, min_len), held_out_grid(max_tokens, min_len),
                                                  passes)
    finally:
        torch.set_num_threads(saved_threads)
    return dataclasses.replace(
        base, **terms, fit_error={**base.fit_error, "elementwise": errors},
        source=(f"{base.source}; elementwise recompute measured afterwards here on whole sequences up to "
                f"{max_tokens} tokens (its bytes by saved-tensor accounting, its ops timed alone)"))


def _median_seconds(fn: Callable[[], object], device: torch.device, runs: int = 5) -> float:
    fn()
    cuda = device.type == "cuda"
    now = time.perf_counter if cuda else _cpu_now()
    times = []
    for _ in range(runs):
        if cuda:
            torch.cuda.synchronize()
        t0 = now()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(now() - t0)
    return statistics.median(times)


def matmul_tflops(device: str, dtype: str, n: int) -> float:
    """Throughput of a plain n^3 matmul here: the ceiling head terms are derived from."""
    dev, dt = torch.device(device), TORCH_DTYPES[dtype]
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    return 2 * n ** 3 / _median_seconds(lambda: a @ b, dev) / 1e12


def copy_bytes_per_s(device: str, mbytes: int = 64) -> float:
    """Read+write bandwidth of a large copy: what the embedding's gather and scatter run at."""
    dev = torch.device(device)
    x = torch.empty(mbytes * 2 ** 20, dtype=torch.uint8, device=dev)
    return 2 * x.numel() / _median_seconds(x.clone, dev)


def profile_device(cfg: ModelConfig, *, layers: int = 1, device: str = "cpu", dtype: str = "float32",
                   max_tokens: int = 1024, min_len: int = 64, warmup: int = 2, reps: int = 5, passes: int = 3,
                   backend: str = "auto", fit_shapes: Sequence[ChunkShape] | None = None,
                   held_out: Sequence[ChunkShape] | None = None, progress: bool = True,
                   error_min_tokens: int | None = None, threads: int = 1,
                   name: str = "") -> tuple[Profile, list[Measurement], list[Measurement]]:
    """Measure the fit grid and the held-out grid, fit, and return the profile with both sets.

    Time errors count held-out chunks of at least ``error_min_tokens`` (default: 1K tokens on GPU,
    where tiny chunks are launch-bound; every held-out chunk on CPU). On CPU, ``threads`` intra-op
    threads are used (one per pipeline process is what the local runtime gives each stage)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    saved_threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(threads)
    try:
        return _profile_device(cfg, layers, device, dtype, max_tokens, min_len, warmup, reps, passes, backend,
                               fit_shapes, held_out, progress, error_min_tokens, threads, name)
    finally:
        torch.set_num_threads(saved_threads)


def _profile_device(cfg, layers, device, dtype, max_tokens, min_len, warmup, reps, passes, backend,
                    fit_shapes, held_out, progress, error_min_tokens, threads, name):
    bench = LayerBench(cfg, layers=layers, device=device, dtype=dtype, backend=backend, warmup=warmup, reps=reps)
    fit_shapes = list(fit_shapes if fit_shapes is not None else fit_grid(max_tokens, min_len))
    held_out = [s for s in (held_out if held_out is not None else held_out_grid(max_tokens, min_len))
                if s not in set(fit_shapes)]
    measured = bench.measure(fit_shapes + held_out, passes=passes, progress=progress,
                             desc=f"profiling {name or 'model'} on {device}")
    measured_fit, measured_held = measured[:len(fit_shapes)], measured[len(fit_shapes):]
    attention = resolve_backend(backend, torch.device(device), TORCH_DTYPES[dtype])
    flash = attention == "varlen"
    if error_min_tokens is None:
        error_min_tokens = ERROR_MIN_TOKENS if bench.cuda else 0
    fit = fit_layer(measured_fit, measured_held,
                    time_features=TIME_FEATURES_FLASH if flash else TIME_FEATURES_SDPA,
                    mem_features=MEM_FEATURES_FLASH if flash else MEM_FEATURES_SDPA,
                    min_tokens=error_min_tokens)
    fit_error = {**fit.fit_error, "attention": attention}
    if bench.cuda:
        ratios = [bench.allocator_bytes(m.shape) / m.act_bytes for m in measured_held]
        fit_error["allocator_over_saved"] = {"median": statistics.median(ratios), "max": max(ratios),
                                             "n": len(ratios)}
    edge_fit = _pow2_upto(min_len, max_tokens)
    edge_held = [n * 3 // 2 for n in edge_fit if n * 3 // 2 <= max_tokens]
    edges = measure_edges(cfg, device, dtype, edge_fit + edge_held, warmup, reps)
    edge_terms = {}
    for part in EDGE_PARTS:
        edge_terms[part] = fit_term([ChunkShape((n,)) for n in edge_fit], [edges[n][part] for n in edge_fit],
                                    ("tokens", "chunk"))
    for side in ("embed", "head"):
        errs = np.concatenate([relative_errors(edge_terms[f"{side}_{d}"], [ChunkShape((n,)) for n in edge_held],
                                               [edges[n][f"{side}_{d}"] for n in edge_held]) for d in ("fwd", "bwd")])
        fit_error[f"{side}_time"] = summarize(errs)
    elementwise_terms, fit_error["elementwise"] = elementwise_profile_terms(bench, fit_shapes, held_out, passes)
    action_fwd, action_bwd = measure_action_overhead(cfg, device, dtype, fit.terms["layer_fwd"], fit.terms["layer_bwd"])
    fit_error["action_overhead_ms"] = {"fwd": action_fwd, "bwd": action_bwd}
    tflops = matmul_tflops(device, dtype, 4096 if bench.cuda else 512)
    bw = copy_bytes_per_s(device)
    where = "" if bench.cuda else f", {threads} CPU thread(s), CPU time of the measuring thread"
    return Profile(
        model=cfg,
        device=torch.cuda.get_device_name(torch.device(device)) if bench.cuda else "cpu",
        dtype=dtype,
        torch_version=torch.__version__,
        source=(f"measured here: {layers} layer(s) of {name or 'the model'}{where}; {len(measured_fit)} fit "
                f"shapes, {len(measured_held)} held-out shapes; lowest over {passes} pass(es) of the median of "
                f"{reps} runs after {warmup} warm-up; activation bytes by saved-tensor accounting, work memory by counting "
                f"live bytes; embedding and head "
                f"(final norm, LM head, blocked loss) measured at {len(edge_fit)} token counts, errors on "
                f"{len(edge_held)} others; elementwise recompute measured on whole sequences (its bytes by saved-tensor "
                f"accounting, its ops timed alone); per-action runtime overhead measured on a one-layer stage; loss working "
                f"memory estimated from the block size; matmul "
                f"{tflops:.3g} TFLOP/s and copy {bw / 1e9:.3g} GB/s recorded for rescaling head terms"),
        fit_error={**fit_error, "matmul_tflops": tflops, "copy_bytes_per_s": bw},
        **fit.terms,
        **edge_terms,
        **elementwise_terms,
        head_work_bytes=loss_work_term(cfg, dtype),
        action_fwd=LinearTerm({"chunk": action_fwd}),
        action_bwd=LinearTerm({"chunk": action_bwd}),
    ), measured_fit, measured_held
