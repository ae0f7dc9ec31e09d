import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infinipipe.cli import main
from infinipipe.contract.cost import (
    MIXED_PRECISION_ADAM,
    CostModel,
    OptimizerStates,
    Profile,
    committed_profiles,
    default_profile,
    default_profile_name,
    load_profile,
)
from infinipipe.contract.model_config import preset
from infinipipe.contract.shapes import ChunkShape
from infinipipe.profiling.fit import (
    MEMORY_TERMS,
    Measurement,
    act_bytes_change,
    elementwise_derived,
    elementwise_moved_bytes,
    fit_layer,
    fit_term,
    memory_from_measurements,
    profile_from_measurements,
    scale_profile,
)
from refit import assert_refit_matches, assert_terms_match

MEASUREMENTS = Path(__file__).resolve().parents[1] / "src/infinipipe/profiles/measurements/h100-layer-costs.json"
GPU_FITTED = {"h100-bf16-llama-7b": "llama-7b", "h100-bf16-llama3-8b": "llama3-8b"}
GPU_DERIVED = {"h100-bf16-llama-13b": "llama-13b", "h100-bf16-llama-30b": "llama-30b"}
ALL = {**GPU_FITTED, **GPU_DERIVED, "cpu-fp32-tiny": "tiny", "cpu-fp32-small": "small"}


def _measured_shapes(data: dict) -> list[ChunkShape]:
    return [Measurement.from_row(r).shape for r in data["rows"]]


def cost(name: str) -> CostModel:
    return CostModel(load_profile(name), preset(ALL[name]))


def test_every_expected_profile_is_committed_and_matches_its_preset():
    assert set(ALL) <= set(committed_profiles())
    for name, model in ALL.items():
        prof = load_profile(name)
        assert prof.model.with_layers(1) == preset(model).with_layers(1)
        assert prof.device and prof.source and prof.torch_version
        assert default_profile_name(model) == name
    assert default_profile("llama-13b").derived_from == "h100-bf16-llama-7b"


@pytest.mark.parametrize("name", sorted(GPU_FITTED))
def test_leave_one_out_time_error_on_gpu_profiles_meets_target(name):
    data = json.loads(MEASUREMENTS.read_text())
    fresh = profile_from_measurements(data, GPU_FITTED[name], preset(GPU_FITTED[name]), MEASUREMENTS.name)
    committed = load_profile(name)
    assert fresh.fit_error["method"] == "leave-one-out"
    for key in ("fwd", "bwd", "time"):
        assert fresh.fit_error[key]["median"] < 0.05
        assert fresh.fit_error[key]["max"] < 0.15
    assert fresh.fit_error["act_bytes"]["max"] < 0.01
    # The committed profile is what these measurements fit to (nobody edited its numbers by hand);
    # its memory terms may come from measurements of this runtime's own layer.
    memory_from = committed.fit_error.get("memory_from")
    if memory_from:
        fresh = memory_from_measurements(fresh, json.loads((MEASUREMENTS.parent / memory_from).read_text()), memory_from)
    change = committed.fit_error.get("act_bytes_change")
    if change:
        fresh = act_bytes_change(fresh, json.loads((MEASUREMENTS.parent / change["from"]).read_text()), change["from"])
    assert_terms_match(fresh, committed, ("layer_fwd", "layer_bwd", *MEMORY_TERMS), _measured_shapes(data))


@pytest.mark.parametrize("name", sorted(GPU_FITTED))
def test_gpu_profile_reproduces_measured_activation_bytes(name):
    prof = load_profile(name)
    memory_from = prof.fit_error.get("memory_from")
    if memory_from:
        data = json.loads((MEASUREMENTS.parent / memory_from).read_text())
        rows = [Measurement.from_row(r) for r in data["fit"] + data["held_out"]]
    else:
        rows = [Measurement.from_row(r) for r in json.loads(MEASUREMENTS.read_text())["rows"]
                if r["model"] == GPU_FITTED[name]]
    # Measured with the layer as it was; the profile's kept bytes were moved since by the change of
    # bytes per token measured on both versions of the layer (`act_bytes_change`).
    moved = prof.fit_error.get("act_bytes_change", {}).get("per_token", 0.0)
    for m in rows:
        assert prof.layer_act_bytes(m.shape) == pytest.approx(m.act_bytes + moved * m.shape.tokens, rel=0.01)


@pytest.mark.parametrize("name", ["cpu-fp32-tiny", "cpu-fp32-small"])
def test_cpu_profile_held_out_errors_meet_targets(name):
    fe = load_profile(name).fit_error
    assert fe["method"] == "held-out" and fe["n_held_out"] >= 10
    assert fe["time"]["median"] < 0.10
    assert fe["act_bytes"]["max"] < 0.05


segments = st.lists(st.integers(1, 8192), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(ALL)), segs=segments, prefix=st.integers(0, 65536), more=st.integers(1, 65536))
def test_more_prefix_never_predicts_less(name, segs, prefix, more):
    cm = cost(name)
    a, b = ChunkShape(tuple(segs), prefix=prefix), ChunkShape(tuple(segs), prefix=prefix + more)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cm.forward_ms(b, 4) >= cm.forward_ms(a, 4)
        assert cm.backward_ms(b, 4) >= cm.backward_ms(a, 4)
        assert cm.recompute_ms(b, 2) >= cm.recompute_ms(a, 2)
        if prefix:  # a slice's own K/V rows live in its sequence's store, a whole segment's in the layer
            assert cm.activation_bytes(b, 4) >= cm.activation_bytes(a, 4) * (1 - 1e-9)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(ALL)), segs=segments, extra=st.integers(1, 4096))
def test_longer_segment_never_predicts_less(name, segs, extra):
    cm = cost(name)
    longer = ChunkShape((segs[0] + extra, *segs[1:]))
    shape = ChunkShape(tuple(segs))
    assert cm.forward_ms(longer, 2, first=True, last=True) > cm.forward_ms(shape, 2, first=True, last=True)
    assert cm.backward_ms(longer, 2) > cm.backward_ms(shape, 2)


@pytest.mark.parametrize("name", sorted(ALL))
def test_first_slice_holds_its_sequences_whole_kv_store_instead_of_its_own_rows(name):
    """Its dK/dV (`dkv_bytes`) is not among what it holds from its forward: the simulator and the
    ILP charge it over the sequence's backwards only."""
    cm = cost(name)
    packed = ChunkShape((2048, 1024, 1024))
    split = ChunkShape((2048, 1024, 1024), kept=16384)
    own_rows = 4 * 2048 * cm.profile.layer_act_bytes.coef.get("kv", 0.0)
    assert cm.kv_bytes(split, 4) == cm.dkv_bytes(split, 4) == 2 * 16384 * cm.model.kv_dim * cm.dtype_bytes * 4
    assert cm.activation_bytes(split, 4) - cm.activation_bytes(packed, 4) == pytest.approx(
        cm.kv_bytes(split, 4) - own_rows)
    assert cm.kv_bytes(packed, 4) == 0


@pytest.mark.parametrize("name", sorted(ALL))
def test_kv_of_a_split_sequence_does_not_grow_with_its_number_of_slices(name):
    """Later slices read their prefix from the store: a slice costs the same whatever its prefix."""
    cm = cost(name)
    early, late = ChunkShape((1024,), prefix=1024), ChunkShape((1024,), prefix=15 * 1024)
    assert cm.activation_bytes(late, 4) - cm.activation_bytes(early, 4) == pytest.approx(
        4 * cm.profile.layer_act_bytes.coef.get("mask_area", 0.0) * (late.mask_area - early.mask_area), abs=1.0)
    assert cm.kv_bytes(late, 4) == cm.kv_bytes(early, 4) == 0


def test_recompute_trades_memory_for_time():
    cm = cost("h100-bf16-llama-7b")
    shape = ChunkShape((8192,))
    assert cm.activation_bytes(shape, 8, recompute=8) < cm.activation_bytes(shape, 8, recompute=0)
    assert cm.recompute_ms(shape, 8) == pytest.approx(cm.forward_ms(shape, 8))
    with pytest.raises(ValueError, match="recompute"):
        cm.activation_bytes(shape, 8, recompute=9)


def test_derived_profile_scales_up_from_its_base():
    small, big = cost("h100-bf16-llama-7b"), cost("h100-bf16-llama-13b")
    shape = ChunkShape((4096, 2048), prefix=8192)
    assert 1.2 < big.forward_ms(shape, 1) / small.forward_ms(shape, 1) < 1.8
    assert 1.2 < big.layer_act_bytes(shape) / small.layer_act_bytes(shape) < 1.4


def test_profile_from_another_model_shape_is_refused():
    with pytest.raises(ValueError, match="profile was made for model shape"):
        CostModel(load_profile("h100-bf16-llama-7b"), preset("llama-13b"))
    # a different layer count is the same shape
    CostModel(load_profile("h100-bf16-llama-7b"), preset("llama-7b").with_layers(2))


def test_unknown_version_and_unknown_terms_are_refused():
    obj = load_profile("h100-bf16-llama-7b").to_json()
    with pytest.raises(ValueError, match="version 99 is not supported"):
        Profile.from_json({**obj, "version": 99})
    with pytest.raises(ValueError, match="unknown cost feature"):
        Profile.from_json({**obj, "terms": {**obj["terms"], "layer_fwd": {"cubic": 1.0}}})
    with pytest.raises(ValueError, match="no committed profile"):
        load_profile("h100-bf16-gpt-5")


def test_measurements_of_another_shape_are_refused():
    data = json.loads(MEASUREMENTS.read_text())
    with pytest.raises(ValueError, match="differs from the preset"):
        profile_from_measurements(data, "llama-7b", preset("llama3-8b"), "m")
    with pytest.raises(ValueError, match="no model"):
        profile_from_measurements(data, "llama-13b", preset("llama-13b"), "m")


def test_far_extrapolation_warns():
    cm = cost("h100-bf16-llama-7b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm.check_range(ChunkShape((8192,), prefix=120000))
    with pytest.warns(UserWarning, match="far outside the profiled range"):
        cm.check_range(ChunkShape((4096,), prefix=4 * 131072))


def test_profile_json_round_trip(tmp_path):
    for name in ALL:
        prof = load_profile(name)
        path = tmp_path / f"{name}.json"
        prof.save(path)
        assert Profile.load(path) == prof
        assert load_profile(str(path)) == prof


def test_fit_recovers_known_coefficients_exactly():
    shapes = [ChunkShape((n,), prefix=c) for n in (256, 1024, 4096) for c in (0, 2048)] + [ChunkShape((512,) * 4)]
    truth = {"attn": 2e-8, "tokens": 1e-3, "kv": 5e-5, "chunk": 0.3}

    def f(s):
        return truth["attn"] * s.attn_pairs + truth["tokens"] * s.tokens + truth["kv"] * s.kv_len + truth["chunk"]

    rows = [Measurement(s, f(s), 2 * f(s), 100 * s.tokens + 10 * s.kv_len) for s in shapes]
    fit = fit_layer(rows)
    for k, v in truth.items():
        assert fit.terms["layer_fwd"].coef[k] == pytest.approx(v, rel=1e-6)
    assert fit.fit_error["fwd"]["max"] < 1e-6


def test_cost_cli_matches_the_cost_model(capsys):
    assert main(["cost", "--profile", "h100-bf16-llama-7b", "--layers", "8", "--segments", "4096,1024,512",
                 "--prefix", "8192", "--recompute", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"forward_ms", "backward_ms", "recompute_ms", "activation_bytes", "kv_bytes"}
    cm = cost("h100-bf16-llama-7b")
    shape = ChunkShape((4096, 1024, 512), prefix=8192)
    assert out["forward_ms"] == pytest.approx(cm.forward_ms(shape, 8))
    assert out["recompute_ms"] == pytest.approx(cm.recompute_ms(shape, 3))
    assert out["activation_bytes"] == pytest.approx(cm.activation_bytes(shape, 8, recompute=3))
    assert out["kv_bytes"] == 0
    assert main(["cost", "--profile", "h100-bf16-llama-7b", "--layers", "8", "--segments", "4096,1024,512",
                 "--prefix", "8192", "--recompute", "3", "--elementwise", "5", "--json"]) == 0
    elem = json.loads(capsys.readouterr().out)
    assert elem["recompute_ms"] == pytest.approx(cm.recompute_ms(shape, 3, 5)) and elem["recompute_ms"] > out["recompute_ms"]
    assert elem["activation_bytes"] == pytest.approx(cm.activation_bytes(shape, 8, recompute=3, elementwise=5))
    assert elem["activation_bytes"] < out["activation_bytes"]


def test_cost_cli_rejects_bad_input(capsys):
    assert main(["cost", "--profile", "h100-bf16-llama-7b", "--layers", "2", "--segments", "64",
                 "--recompute", "3"]) == 2
    assert "--recompute" in capsys.readouterr().err
    assert main(["cost", "--profile", "h100-bf16-llama-7b", "--layers", "2", "--segments", "64",
                 "--recompute", "1", "--elementwise", "2"]) == 2
    assert "--elementwise" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["cost", "--profile", "h100-bf16-llama-7b", "--layers", "2", "--segments", "64,x"])


def test_profile_cli_from_measurements_reports_held_out_error(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["profile", "--from-measurements", str(MEASUREMENTS), "--model", "llama3-8b",
                 "--elementwise-from", str(MEASUREMENTS.parent / "layer-bytes-elementwise-cpu-bf16.json"),
                 "--host-link", "published", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["fit_error"]["time"]["median"] < 0.05
    assert_refit_matches(Profile.load(out), load_profile("h100-bf16-llama3-8b"),
                         _measured_shapes(json.loads(MEASUREMENTS.read_text())))
    assert np.isfinite(summary["fit_error"]["time"]["max"])


def test_flop_scaling_from_llama_7b_predicts_the_measured_llama3_8b_layer():
    """The derivation used for the 13B/30B profiles, checked where both shapes were measured (both
    layers of one implementation, so the 7B base is refitted to the same file)."""
    data = json.loads(MEASUREMENTS.read_text())
    base = profile_from_measurements(data, "llama-7b", preset("llama-7b"), MEASUREMENTS.name)
    scaled = scale_profile(base, preset("llama3-8b"), "h100-bf16-llama-7b")
    rows = [Measurement.from_row(r) for r in json.loads(MEASUREMENTS.read_text())["rows"]
            if r["model"] == "llama3-8b"]
    checks = (("fwd_ms", scaled.layer_fwd, 0.05, 0.15), ("bwd_ms", scaled.layer_bwd, 0.05, 0.15),
              ("act_bytes", scaled.layer_act_bytes, 0.03, 0.03))
    for quantity, term, med, worst in checks:
        errors = np.array([abs(term(m.shape) - m.value(quantity)) / m.value(quantity) for m in rows])
        assert np.median(errors) < med and errors.max() < worst, quantity


def test_memory_terms_from_another_measurement_keep_times_and_refuse_other_shapes_or_dtypes():
    data = json.loads((MEASUREMENTS.parent / "h200-bf16-llama-7b.json").read_text())
    base = load_profile("h100-bf16-llama-7b")
    mixed = memory_from_measurements(base, data, "rows")
    assert mixed.layer_fwd == base.layer_fwd and mixed.layer_bwd == base.layer_bwd
    assert mixed.layer_fwd_work_bytes is not None and mixed.fit_error["memory_from"] == "rows"
    with pytest.raises(ValueError, match="layer shape"):
        memory_from_measurements(load_profile("h100-bf16-llama-13b"), data, "rows")
    with pytest.raises(ValueError, match="float32"):
        memory_from_measurements(base, {**data, "dtype": "float32"}, "rows")


def test_model_states_default_to_training_in_the_profiles_precision():
    """`infinipipe plan` and `bench` build their cost model without naming the optimizer; a bf16
    run keeps fp32 gradients, master weights and moments beside its bf16 weights (18 bytes a
    parameter, as the runtime's planner charges), not fp32 AdamW's 16."""
    bf16 = CostModel(load_profile("h100-bf16-llama-7b"), preset("llama-7b"))
    assert bf16.optimizer == MIXED_PRECISION_ADAM and bf16.optimizer.per_param == 18
    fp32 = CostModel(load_profile("cpu-fp32-tiny"), preset("tiny"))
    assert fp32.optimizer == OptimizerStates()


CHANGE = MEASUREMENTS.parent / "layer-bytes-cpu-bf16.json"


@pytest.mark.parametrize("model", ["llama-7b", "llama-13b", "llama-30b"])
def test_gpu_profiles_keep_the_measured_layer_bytes_moved_by_the_cpu_measured_change(model):
    """Each H200 measurement of the former layer equals the CPU count of that layer less the second
    copy of the attention output that only SDPA per segment keeps (hidden bytes per token): the
    bytes a layer keeps beside its kernel's own do not depend on the device. So the new layer's
    kept bytes on the GPU are the measured ones moved by the change the CPU measured."""
    data = json.loads(CHANGE.read_text())
    cpu = {v: next(r for r in data[v]["shapes"] if r["model"] == model) for v in ("before", "after")}
    h200 = json.loads((MEASUREMENTS.parent / f"h200-bf16-{model}.json").read_text())
    rows = [Measurement.from_row(r) for r in h200["fit"]]
    measured = fit_term([m.shape for m in rows], [m.act_bytes for m in rows], ("tokens", "kv", "chunk")).coef["tokens"]
    sdpa_copy = 2 * preset(model).hidden
    assert measured == pytest.approx(
        cpu["before"]["act_bytes_per_token_beside_kv"] - sdpa_copy, rel=1e-6)
    moved = cpu["after"]["terms"]["act_bytes"]["tokens"] - cpu["before"]["terms"]["act_bytes"]["tokens"]
    for name in (f"h200-bf16-{model}", f"h100-bf16-{model}"):
        prof = load_profile(name)
        assert prof.fit_error["act_bytes_change"] == {"from": CHANGE.name, "per_token": moved}
        assert prof.layer_act_bytes.coef["tokens"] == pytest.approx(measured + moved, rel=1e-6)
    if model == "llama-7b":  # the target: a third fewer than the 170,632 the H200 measured
        assert load_profile("h200-bf16-llama-7b").layer_act_bytes.coef["tokens"] < 116_000


def test_act_bytes_change_moves_only_the_per_token_bytes_once_and_refuses_other_layers():
    data = json.loads(CHANGE.read_text())
    base = load_profile("h100-bf16-llama3-8b")
    with pytest.raises(ValueError, match="no after measurement"):
        act_bytes_change(base, data, "c.json")
    seven = dataclasses.replace(load_profile("h200-bf16-llama-7b"),
                                fit_error={k: v for k, v in load_profile("h200-bf16-llama-7b").fit_error.items()
                                           if k != "act_bytes_change"})
    moved = act_bytes_change(seven, data, "c.json")
    assert moved.layer_fwd == seven.layer_fwd and moved.layer_fwd_work_bytes == seven.layer_fwd_work_bytes
    assert moved.layer_act_bytes.coef["kv"] == seven.layer_act_bytes.coef["kv"]
    assert moved.layer_act_bytes.coef["tokens"] < seven.layer_act_bytes.coef["tokens"]
    with pytest.raises(ValueError, match="already moved"):
        act_bytes_change(moved, data, "c.json")
    with pytest.raises(ValueError, match="float32"):
        act_bytes_change(seven, {**data, "dtype": "float32"}, "c.json")


ELEMENTWISE = MEASUREMENTS.parent / "layer-bytes-elementwise-cpu-bf16.json"


@pytest.mark.parametrize("name", ["h100-bf16-llama-7b", "h100-bf16-llama-13b", "h100-bf16-llama-30b",
                                  "h100-bf16-llama3-8b", "h200-bf16-llama-7b", "h200-bf16-llama-13b",
                                  "h200-bf16-llama-30b"])
def test_gpu_profiles_offer_elementwise_recompute_of_the_norm_outputs_and_swiglu_product(name):
    """The bytes an elementwise layer keeps fewer are its two normalised inputs and the SwiGLU
    product, measured on CPU (elementwise tensors, the same on every device); its recompute costs a
    fraction of a layer's forward and saves more bytes per millisecond than recomputing the layer."""
    prof = load_profile(name)
    cfg = prof.model
    assert prof.layer_elementwise_bytes.coef == {"tokens": (2 * cfg.hidden + cfg.ffn) * 2}
    assert prof.fit_error["elementwise"]["from"] == ELEMENTWISE.name
    cm = CostModel(prof, cfg)
    shape = ChunkShape((4096,))
    elem_ms, full_ms = cm.recompute_ms(shape, 0, 1), cm.recompute_ms(shape, 1)
    assert 0 < elem_ms < 0.3 * full_ms
    full_bytes = cm.layer_act_bytes(shape) - cm.ckpt_layer_bytes(shape)
    assert cm.elementwise_saved_bytes(shape) / elem_ms > full_bytes / full_ms


def test_elementwise_terms_are_optional_and_derived_only_for_the_profiles_layer_and_dtype():
    data = json.loads(ELEMENTWISE.read_text())
    with_terms = load_profile("h100-bf16-llama-7b")
    bare = dataclasses.replace(with_terms, layer_elementwise_bytes=None, layer_elementwise_ms=None)
    loaded = Profile.from_json(json.loads(json.dumps(bare.to_json())))
    assert "layer_elementwise_bytes" not in bare.to_json()["terms"] and not CostModel(loaded, loaded.model).elementwise
    assert CostModel(loaded, loaded.model).elementwise_saved_bytes(ChunkShape((64,))) == 0
    derived = elementwise_derived(bare, data, ELEMENTWISE.name)
    assert derived.layer_elementwise_bytes == with_terms.layer_elementwise_bytes
    assert derived.layer_elementwise_ms.coef["tokens"] == pytest.approx(
        elementwise_moved_bytes(bare.model, "bfloat16") / 3.35e12 * 1e3)
    with pytest.raises(ValueError, match="float32"):
        elementwise_derived(bare, {**data, "dtype": "float32"}, "e.json")
    with pytest.raises(ValueError, match="no elementwise measurement"):
        elementwise_derived(bare, {**data, "shapes": [r for r in data["shapes"] if r["model"] != "llama-7b"]}, "e.json")


def test_scaling_a_profile_carries_its_elementwise_terms_to_the_larger_shape():
    """Scaled from 7B, the 13B and 30B elementwise terms are what their own derivation gives: the
    values kept fewer and the bytes moved both follow the shape."""
    for model in ("llama-13b", "llama-30b"):
        scaled = scale_profile(load_profile("h100-bf16-llama-7b"), preset(model), "h100-bf16-llama-7b")
        committed = load_profile(f"h100-bf16-{model}")
        for term in ("layer_elementwise_bytes", "layer_elementwise_ms"):
            got, want = getattr(scaled, term).coef, getattr(committed, term).coef
            assert set(got) == set(want) and all(got[k] == pytest.approx(want[k], rel=1e-9) for k in want), (model, term)
