"""Fitting cost-model coefficients to measurements, and judging the fit on shapes it did not see.

Coefficients come from non-negative least squares on *relative* residuals: chunk times span two
orders of magnitude, and an absolute fit would trade 10% errors on short chunks for 0.1% on long
ones. Non-negative coefficients keep the model monotone (more prefix, more tokens never cost
less). Errors are reported on held-out shapes (or leave-one-out when every shape is needed).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import nnls

from ..contract.cost import DTYPE_BYTES, LOSS_BLOCK_TOKENS, LinearTerm, Profile
from ..contract.model_config import ModelConfig, preset
from ..contract.shapes import FEATURES, ChunkShape

TIME_FEATURES_FLASH = ("attn", "tokens", "kv", "chunk")
MEM_FEATURES_FLASH = ("tokens", "kv", "chunk")
# SDPA per segment runs causal segments with a flash kernel, but a slice with a cached prefix
# needs an explicit mask: the kernel then computes and keeps the whole masked rectangle. One
# call per segment also costs a fixed time per packed sequence (on a CPU 0.03 ms forward and
# 0.08 ms backward per layer for the tiny model: 1.6 ms on a 2-layer stage's chunk of 16).
TIME_FEATURES_SDPA = ("attn", "mask_area", "tokens", "kv", "chunk", "extra_segments")
MEM_FEATURES_SDPA = ("mask_area", "tokens", "kv", "chunk")

ERROR_MIN_TOKENS = 1024
# H100 SXM5 HBM3 datasheet bandwidth; only used for the embedding, which does no FLOPs.
H100_HBM_BYTES_PER_S = 3.35e12


@dataclass(frozen=True)
class Measurement:
    """One chunk shape measured on one layer: forward and backward time, bytes kept for backward."""

    shape: ChunkShape
    fwd_ms: float
    bwd_ms: float
    act_bytes: float
    fwd_work_bytes: float | None = None
    bwd_work_bytes: float | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Measurement":
        """Rows carry ``seg_q`` (new tokens per segment) and ``seg_pre`` (cached prefix per segment)."""
        q, pre = list(row["seg_q"]), list(row["seg_pre"])
        if len(q) != len(pre) or sum(1 for c in pre if c) > 1:
            raise ValueError(f"measurement row needs matching seg_q/seg_pre with at most one prefix: {row}")
        first = max(range(len(q)), key=lambda i: pre[i])
        segs = [q[first]] + [s for i, s in enumerate(q) if i != first]
        for key in ("fwd_ms", "bwd_ms", "act_bytes"):
            if not float(row[key]) > 0:
                raise ValueError(f"measurement row has non-positive {key}: {row}")
        work = [float(row[k]) if row.get(k) is not None else None for k in WORK_QUANTITIES]
        return cls(ChunkShape(tuple(segs), prefix=pre[first]), float(row["fwd_ms"]), float(row["bwd_ms"]),
                   float(row["act_bytes"]), *work)

    def to_row(self) -> dict[str, Any]:
        pre = [self.shape.prefix] + [0] * (len(self.shape.seg_lens) - 1)
        row = {"seg_q": list(self.shape.seg_lens), "seg_pre": pre,
               "fwd_ms": self.fwd_ms, "bwd_ms": self.bwd_ms, "act_bytes": self.act_bytes}
        row.update({k: getattr(self, k) for k in WORK_QUANTITIES if getattr(self, k) is not None})
        return row

    def value(self, quantity: str) -> float:
        return getattr(self, quantity)


QUANTITIES = ("fwd_ms", "bwd_ms", "act_bytes")
WORK_QUANTITIES = ("fwd_work_bytes", "bwd_work_bytes")


def _design(shapes: Sequence[ChunkShape], names: Sequence[str]) -> np.ndarray:
    unknown = set(names) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown cost feature(s) {sorted(unknown)}; known: {FEATURES}")
    return np.array([[s.features[n] for n in names] for s in shapes], dtype=float)


def fit_term(shapes: Sequence[ChunkShape], y: Sequence[float], names: Sequence[str]) -> LinearTerm:
    """Non-negative least squares on relative residuals; columns are scaled for conditioning."""
    if len(shapes) < len(names):
        raise ValueError(f"need at least {len(names)} measurements to fit {list(names)}, got {len(shapes)}")
    x = _design(shapes, names)
    yv = np.asarray(y, dtype=float)
    w = 1.0 / yv
    xw = x * w[:, None]
    scale = np.abs(xw).max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(xw / scale, yv * w)
    coef = coef / scale
    return LinearTerm({n: float(c) for n, c in zip(names, coef)})


def relative_errors(term: LinearTerm, shapes: Sequence[ChunkShape], y: Sequence[float]) -> np.ndarray:
    return np.array([abs(term(s) - v) / v for s, v in zip(shapes, y)])


def leave_one_out_errors(shapes: Sequence[ChunkShape], y: Sequence[float], names: Sequence[str]) -> np.ndarray:
    """Each shape predicted by a fit on all the others."""
    out = []
    for i in range(len(shapes)):
        rest = [j for j in range(len(shapes)) if j != i]
        term = fit_term([shapes[j] for j in rest], [y[j] for j in rest], names)
        out.append(abs(term(shapes[i]) - y[i]) / y[i])
    return np.array(out)


def summarize(errors: np.ndarray) -> dict[str, float | int]:
    if len(errors) == 0:
        return {"median": None, "max": None, "n": 0}
    return {"median": float(np.median(errors)), "max": float(np.max(errors)), "n": int(len(errors))}


@dataclass(frozen=True)
class LayerFit:
    """Fitted per-layer terms and their error on shapes outside the fit."""

    terms: dict[str, LinearTerm]
    fit_error: dict[str, Any]


def fit_layer(fit_set: Sequence[Measurement], held_out: Sequence[Measurement] | None = None,
              time_features: Sequence[str] = TIME_FEATURES_FLASH,
              mem_features: Sequence[str] = MEM_FEATURES_FLASH,
              min_tokens: int = ERROR_MIN_TOKENS) -> LayerFit:
    """Fit layer_fwd/layer_bwd/layer_act_bytes on ``fit_set``; errors on ``held_out`` when given,
    else leave-one-out over ``fit_set``. Time errors count chunks of at least ``min_tokens``."""
    names = {"fwd_ms": time_features, "bwd_ms": time_features, "act_bytes": mem_features}
    shapes = [m.shape for m in fit_set]
    terms, errs = {}, {}
    for q in QUANTITIES:
        y = [m.value(q) for m in fit_set]
        terms[q] = fit_term(shapes, y, names[q])
        if held_out is None:
            errs[q] = leave_one_out_errors(shapes, y, names[q])
        else:
            errs[q] = relative_errors(terms[q], [m.shape for m in held_out], [m.value(q) for m in held_out])
    judged = list(fit_set if held_out is None else held_out)
    big = np.array([m.shape.tokens >= min_tokens for m in judged], dtype=bool)
    every = list(fit_set) + list(held_out or [])
    fit_error: dict[str, Any] = {
        "method": "leave-one-out" if held_out is None else "held-out",
        "n_fit": len(fit_set),
        "n_held_out": len(judged),
        "time_min_tokens": min_tokens,
        "fwd": summarize(errs["fwd_ms"][big]),
        "bwd": summarize(errs["bwd_ms"][big]),
        "time": summarize(np.concatenate([errs["fwd_ms"][big], errs["bwd_ms"][big]])),
        "act_bytes": summarize(errs["act_bytes"]),
        "max_kv_len": max(m.shape.kv_len for m in every),
        "min_tokens_measured": min(m.shape.tokens for m in every),
    }
    fitted = {"layer_fwd": terms["fwd_ms"], "layer_bwd": terms["bwd_ms"], "layer_act_bytes": terms["act_bytes"]}
    if all(m.fwd_work_bytes is not None and m.bwd_work_bytes is not None for m in every):
        for q in WORK_QUANTITIES:
            fitted[f"layer_{q}"] = fit_term(shapes, [m.value(q) for m in fit_set], mem_features)
            fit_error[q] = summarize(relative_errors(fitted[f"layer_{q}"], [m.shape for m in judged],
                                                     [m.value(q) for m in judged]))
    return LayerFit(fitted, fit_error)


def flops_head_terms(cfg: ModelConfig, dtype: str, matmul_tflops: float,
                     bytes_per_s: float = H100_HBM_BYTES_PER_S,
                     block_tokens: int = LOSS_BLOCK_TOKENS) -> dict[str, LinearTerm]:
    """Head and embedding terms where only a matmul throughput is known.

    The LM head is a ``hidden x vocab`` matmul; the loss forms the logits and both their
    gradients in forward (`model.loss`): 6 FLOPs per weight per token. Its backward only scales
    what forward kept, at memory bandwidth: the hidden states' gradient per token and the head's
    weight gradient once per chunk. The embedding does no FLOPs: its forward gathers rows and its
    backward fills a dense ``vocab x hidden`` gradient once per chunk, both at memory bandwidth.
    """
    ms_per_flop = 1e3 / (matmul_tflops * 1e12)
    head = cfg.hidden * cfg.vocab_size
    b = DTYPE_BYTES[dtype]
    ms_per_byte = 1e3 / bytes_per_s
    return {
        "head_fwd": LinearTerm({"tokens": 6 * head * ms_per_flop}),
        "head_bwd": LinearTerm({"tokens": 2 * cfg.hidden * b * ms_per_byte, "chunk": 2 * head * b * ms_per_byte}),
        "embed_fwd": LinearTerm({"tokens": 2 * cfg.hidden * b * ms_per_byte}),
        "embed_bwd": LinearTerm({"tokens": 2 * cfg.hidden * b * ms_per_byte,
                                 "chunk": 3 * cfg.embedding_params() * b * ms_per_byte}),
        "head_work_bytes": loss_work_term(cfg, dtype, block_tokens),
    }


def loss_work_term(cfg: ModelConfig, dtype: str, block_tokens: int = LOSS_BLOCK_TOKENS) -> LinearTerm:
    """One token block's logits (compute dtype), their fp32 log-softmax and fp32 gradient."""
    return LinearTerm({"chunk": block_tokens * cfg.vocab_size * (DTYPE_BYTES[dtype] + 8)})


def layer_matmul_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs of a layer's projections and MLP per token."""
    return 2.0 * (cfg.hidden * (cfg.hidden + 2 * cfg.kv_dim) + cfg.hidden * cfg.hidden + 3 * cfg.hidden * cfg.ffn)


def layer_saved_width(cfg: ModelConfig) -> float:
    """Values per token a layer keeps for backward (norm inputs, Q/K/V, attention output, MLP
    gate/up/product), with K/V at full head count as the measured kernels use them."""
    return 8.0 * cfg.hidden + 4.0 * cfg.ffn


def scale_profile(base: Profile, target: ModelConfig, base_name: str) -> Profile:
    """Derive a profile for another shape by scaling each term with its FLOPs (bytes for memory).

    Attention costs 4 * heads * head_dim FLOPs per (query, key) pair; the per-token term follows
    the projection/MLP FLOPs; the per-key term (reading and keeping K/V) follows the attention
    width, since the measured kernels use K/V at full head count; the fixed per-chunk overhead
    (kernel launches) does not change. Assumes the same kernel efficiency at the new size.
    Elementwise-recompute terms, where the base has them, follow the values the mode keeps fewer
    (``2 x hidden + ffn``) and the bytes its recompute moves.
    """
    src = base.model
    attn = (target.heads * target.head_dim) / (src.heads * src.head_dim)
    lin = layer_matmul_flops_per_token(target) / layer_matmul_flops_per_token(src)
    kv = attn  # the measured kernels read and keep K/V at full head count (repeated for GQA)
    width = layer_saved_width(target) / layer_saved_width(src)
    time_scale = {"attn": attn, "mask_area": attn, "tokens": lin, "kv": kv, "chunk": 1.0, "extra_segments": 1.0}
    mem_scale = {"attn": attn, "mask_area": attn, "tokens": width, "kv": kv, "chunk": 1.0, "extra_segments": 1.0}

    def scaled(term: LinearTerm, factors: Mapping[str, float]) -> LinearTerm:
        return LinearTerm({k: v * factors[k] for k, v in term.coef.items()})

    tflops = base.fit_error.get("matmul_tflops")
    if tflops is None:
        raise ValueError(f"profile {base_name!r} has no matmul_tflops to derive head terms from")
    head = flops_head_terms(target, base.dtype, tflops)
    fit_error = {k: v for k, v in base.fit_error.items() if k in ("matmul_tflops", "max_kv_len", "min_tokens_measured")}
    elementwise = {}
    if base.layer_elementwise_bytes is not None and base.layer_elementwise_ms is not None:
        fewer = (2 * target.hidden + target.ffn) / (2 * src.hidden + src.ffn)
        moved = elementwise_moved_bytes(target, base.dtype) / elementwise_moved_bytes(src, base.dtype)
        elementwise = {"layer_elementwise_bytes": scaled(base.layer_elementwise_bytes, {"tokens": fewer, "chunk": 1.0}),
                       "layer_elementwise_ms": scaled(base.layer_elementwise_ms, {"tokens": moved, "chunk": 1.0})}
    return Profile(
        model=target,
        device=base.device,
        dtype=base.dtype,
        layer_fwd=scaled(base.layer_fwd, time_scale),
        layer_bwd=scaled(base.layer_bwd, time_scale),
        layer_act_bytes=scaled(base.layer_act_bytes, mem_scale),
        torch_version=base.torch_version,
        source=(f"derived from {base_name} by scaling each layer term with its FLOPs (attention pairs x "
                f"{attn:.3f}, per-token projections/MLP x {lin:.3f}, K/V reads x {kv:.3f}, fixed overhead "
                f"x 1) and activation bytes with the saved width (x {width:.3f}); head/embedding terms "
                f"from FLOPs at {tflops:.0f} TFLOP/s"),
        derived_from=base_name,
        fit_error=fit_error,
        host_link=base.host_link,  # the same device and host
        **head,
        **elementwise,
    )


def profile_from_measurements(data: Mapping[str, Any], model_name: str, cfg: ModelConfig,
                              source_name: str) -> Profile:
    """Fit a per-layer GPU profile from a shared measurement file (rows of one model name)."""
    shapes = data.get("shapes", {})
    if model_name not in shapes:
        raise ValueError(f"measurements have no model {model_name!r}; they hold {sorted(shapes)}")
    want = {"hidden": cfg.hidden, "heads": cfg.heads, "kv_heads": cfg.kv_heads, "ffn": cfg.ffn}
    got = {k: shapes[model_name].get(k) for k in want}
    if got != want:
        raise ValueError(f"measured shape of {model_name!r} {got} differs from the preset {want}")
    rows = [Measurement.from_row(r) for r in data["rows"] if r["model"] == model_name]
    fit = fit_layer(rows)
    dtype = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}.get(data.get("dtype", ""))
    if dtype is None:
        raise ValueError(f"measurement dtype {data.get('dtype')!r} is not supported")
    tflops = float(data["matmul_tflops"])
    fit_error = {**fit.fit_error, "matmul_tflops": tflops}
    return Profile(
        model=cfg,
        device=data["device"],
        dtype=dtype,
        torch_version=data.get("torch", ""),
        source=(f"layer terms fitted to {len(rows)} measured shapes of one {model_name} layer in {source_name} "
                f"({data.get('attention', 'unknown attention')}); head and embedding terms derived from FLOPs "
                f"at the measured matmul throughput {tflops:.0f} TFLOP/s (embedding from bytes at HBM "
                "bandwidth), not measured"),
        fit_error=fit_error,
        **fit.terms,
        **flops_head_terms(cfg, dtype, tflops),
    )


MEMORY_TERMS = ("layer_act_bytes", "layer_fwd_work_bytes", "layer_bwd_work_bytes")


def memory_from_measurements(base: Profile, data: Mapping[str, Any], source_name: str) -> Profile:
    """``base`` with its memory terms refitted to measurements of this runtime's layer of the same
    shape and dtype (``infinipipe profile --measurements-out``, on any GPU).

    Bytes kept and held for a moment depend on the layer's code and kernels, not on the GPU's
    speed: timings measured on one GPU, or of another implementation of the layer, keep their
    time terms while the memory terms describe what this runtime allocates.
    """
    if data.get("dtype") != base.dtype:
        raise ValueError(f"{source_name}: measured in {data.get('dtype')}, the profile is {base.dtype}")
    model = data.get("model")
    if model is None or preset(model).cost_shape() != base.model.cost_shape():
        raise ValueError(f"{source_name}: measured model {model!r} is not the profile's layer shape")
    fit_rows = [Measurement.from_row(r) for r in data["fit"]]
    held = [Measurement.from_row(r) for r in data["held_out"]]
    if any(m.fwd_work_bytes is None or m.bwd_work_bytes is None for m in fit_rows + held):
        raise ValueError(f"{source_name}: rows lack fwd_work_bytes/bwd_work_bytes (measured before they were recorded)")
    features = MEM_FEATURES_SDPA if data.get("attention") == "sdpa" else MEM_FEATURES_FLASH
    terms, errors = {}, {}
    for term, quantity in zip(MEMORY_TERMS, ("act_bytes", *WORK_QUANTITIES)):
        terms[term] = fit_term([m.shape for m in fit_rows], [m.value(quantity) for m in fit_rows], features)
        errors[quantity] = summarize(relative_errors(terms[term], [m.shape for m in held],
                                                     [m.value(quantity) for m in held]))
    return dataclasses.replace(
        base, **terms,
        fit_error={**base.fit_error, **errors, "memory_from": source_name},
        source=(f"{base.source}; memory terms (kept activations, layer work memory) fitted instead to "
                f"{len(fit_rows)} shapes of this runtime's layer measured on {data.get('device')} in {source_name}, "
                f"errors on {len(held)} held-out shapes"))


def act_bytes_change(base: Profile, data: Mapping[str, Any], source_name: str) -> Profile:
    """``base`` with the bytes per token its layer keeps moved by what a new version of the layer
    changed, measured on another device (`benchmarks/layer_bytes.py` run on both versions, in the
    profile's dtype): the difference of the two versions' kept bytes per token for the profile's
    layer shape is added to its ``tokens`` coefficient; the other terms stay.

    A difference rather than a ratio: the bytes a change removes (upcast copies, outputs kept twice)
    are elementwise tensors whose size does not depend on the attention kernel, while each device's
    kernel keeps its own amount beside them (on CPU, SDPA per segment keeps its output in a second
    copy that flash attention on a GPU does not). Until the layer is measured on the GPU itself, the
    profile says so in its source and ``fit_error.act_bytes_change``.
    """
    if "act_bytes_change" in base.fit_error:
        raise ValueError(f"the profile's kept bytes were already moved ({base.fit_error['act_bytes_change']})")
    if data.get("dtype") != base.dtype:
        raise ValueError(f"{source_name}: measured in {data.get('dtype')}, the profile is {base.dtype}")

    def per_token(version: str) -> float:
        for row in data[version]["shapes"]:
            if preset(row["model"]).cost_shape() == base.model.cost_shape():
                return float(row["terms"]["act_bytes"]["tokens"])
        raise ValueError(f"{source_name}: no {version} measurement of the profile's layer shape")

    delta = per_token("after") - per_token("before")
    coef = dict(base.layer_act_bytes.coef)
    coef["tokens"] = coef.get("tokens", 0.0) + delta
    if coef["tokens"] <= 0:
        raise ValueError(f"{source_name}: moving {base.layer_act_bytes.coef.get('tokens', 0.0):,.0f} bytes per token "
                         f"by {delta:+,.0f} leaves none")
    return dataclasses.replace(
        base, layer_act_bytes=LinearTerm(coef),
        fit_error={**base.fit_error, "act_bytes_change": {"from": source_name, "per_token": delta}},
        source=(f"{base.source}; kept bytes per token moved by {delta:+,.0f} to the layer with "
                f"{data['after'].get('layer', 'a new version')} (both versions measured on {data.get('device')} "
                f"in {source_name}), awaiting a measurement on the device"))


ELEMENTWISE_FEATURES = ("tokens", "chunk")


def fit_elementwise(fit_rows: Mapping[ChunkShape, tuple[float, float]],
                    held_rows: Mapping[ChunkShape, tuple[float, float]]) -> tuple[dict[str, LinearTerm], dict[str, Any]]:
    """``layer_elementwise_bytes`` and ``layer_elementwise_ms`` fitted to (bytes kept fewer, recompute
    ms) per shape, judged on ``held_rows``: the tensors it recomputes are per token, so a
    per-token and a per-chunk coefficient describe both."""
    terms, errors = {}, {}
    for k, (term, quantity) in enumerate((("layer_elementwise_bytes", "bytes"), ("layer_elementwise_ms", "ms"))):
        terms[term] = fit_term(list(fit_rows), [v[k] for v in fit_rows.values()], ELEMENTWISE_FEATURES)
        errors[quantity] = summarize(relative_errors(terms[term], list(held_rows), [v[k] for v in held_rows.values()]))
    return terms, errors


def elementwise_moved_bytes(cfg: ModelConfig, dtype: str) -> float:
    """Bytes per token the elementwise recompute reads and writes as this runtime runs it (eager
    kernels, `rms_normalised` twice and `swiglu_product`): per normalised value an upcast to fp32
    (unless the dtype is already that wide), the scale by the reciprocal RMS, the cast back and the
    weight's product; per product value silu and the multiplication."""
    b = DTYPE_BYTES[dtype]
    wide = b >= 4
    per_norm = (0 if wide else b + 4) + 2 * max(b, 4) + (0 if wide else 4 + b) + 2 * b
    return 2 * cfg.hidden * per_norm + cfg.ffn * 5 * b


def elementwise_derived(base: Profile, data: Mapping[str, Any], source_name: str) -> Profile:
    """``base`` with elementwise-recompute terms for a device it was not measured on: the bytes an
    elementwise layer keeps fewer per token as `benchmarks/layer_bytes.py` measured them for the
    profile's layer shape and dtype (elementwise tensors, the same on every device), and the
    recompute's time as the bytes it moves (`elementwise_moved_bytes`) at the copy bandwidth the
    profile recorded on its device, or the H100 datasheet's where it recorded none."""
    if data.get("dtype") != base.dtype:
        raise ValueError(f"{source_name}: measured in {data.get('dtype')}, the profile is {base.dtype}")
    row = next((r for r in data.get("shapes", []) if preset(r["model"]).cost_shape() == base.model.cost_shape()), None)
    if row is None or "elementwise_saved_bytes" not in row.get("terms", {}):
        raise ValueError(f"{source_name}: no elementwise measurement of the profile's layer shape")
    saved = float(row["terms"]["elementwise_saved_bytes"]["tokens"])
    bandwidth = float(base.fit_error.get("copy_bytes_per_s", H100_HBM_BYTES_PER_S))
    moved = elementwise_moved_bytes(base.model, base.dtype)
    return dataclasses.replace(
        base, layer_elementwise_bytes=LinearTerm({"tokens": saved}),
        layer_elementwise_ms=LinearTerm({"tokens": moved / bandwidth * 1e3}),
        fit_error={**base.fit_error, "elementwise": {"from": source_name, "saved_bytes_per_token": saved,
                                                     "moved_bytes_per_token": moved, "bytes_per_s": bandwidth}},
        source=(f"{base.source}; elementwise recompute: {saved:,.0f} bytes per token kept fewer as measured on "
                f"{data.get('device', 'another device')} in {source_name}, its time derived from {moved:,.0f} bytes "
                f"moved per token at {bandwidth / 1e12:.2f} TB/s"))
