import json

import pytest
import torch

from infinipipe.cli import main
from infinipipe.contract.cost import CostModel, Profile, load_profile
from infinipipe.contract.model_config import preset
from infinipipe.contract.shapes import ChunkShape
from infinipipe.profiling.measure import LayerBench, fit_grid, held_out_grid, profile_device

TINY = preset("tiny")


def test_grid_covers_what_plans_produce_and_held_out_shapes_are_new():
    grid = fit_grid(512)
    assert any(len(s.seg_lens) == 1 and s.prefix == 0 for s in grid)  # whole sequences
    assert any(len(s.seg_lens) > 1 and s.prefix == 0 for s in grid)  # packed short ones
    assert any(len(s.seg_lens) == 1 and s.prefix >= 4 * s.seg_lens[0] for s in grid)  # long prefixes
    assert any(len(s.seg_lens) > 1 and s.prefix > 0 for s in grid)  # hybrid
    assert min(min(s.seg_lens) for s in grid) == 64 and max(s.tokens for s in grid) == 512
    held = held_out_grid(512)
    assert held and not set(held) & set(grid)


def test_memory_model_matches_saved_tensor_accounting_on_every_held_out_shape():
    fit = [ChunkShape((n,)) for n in (64, 128, 256)] + [ChunkShape((64, 64))] + \
          [ChunkShape((64,), prefix=c) for c in (64, 192)] + [ChunkShape((128, 64), prefix=128)]
    held = [ChunkShape((96,)), ChunkShape((160, 48, 16)), ChunkShape((80,), prefix=300),
            ChunkShape((100, 30), prefix=70)]
    prof, _, measured = profile_device(TINY, layers=1, max_tokens=256, warmup=1, reps=3, passes=1,
                                       fit_shapes=fit, held_out=held, progress=False, name="tiny")
    assert prof.fit_error["method"] == "held-out" and prof.fit_error["n_held_out"] == len(held)
    for m in measured:
        assert prof.layer_act_bytes(m.shape) == pytest.approx(m.act_bytes, rel=0.05)
    assert prof.fit_error["act_bytes"]["max"] < 0.05
    # Times on a shared CPU are noisy (their agreement is a benchmark); the fitted model must still
    # charge more for more work: more tokens, and a longer cached prefix.
    assert prof.layer_fwd(ChunkShape((256,))) > prof.layer_fwd(ChunkShape((64,)))
    assert prof.layer_bwd(ChunkShape((64,), prefix=192)) > prof.layer_bwd(ChunkShape((64,)))
    assert Profile.from_json(json.loads(json.dumps(prof.to_json()))) == prof
    # An elementwise-recompute layer keeps both normalised inputs and the SwiGLU product fewer
    # (fp32), measured on the whole sequences, and its recompute takes time.
    per_token = (2 * TINY.hidden + TINY.ffn) * 4
    assert prof.layer_elementwise_bytes(ChunkShape((96,))) == pytest.approx(96 * per_token, rel=0.05)
    assert prof.layer_elementwise_ms(ChunkShape((256,))) > 0 and CostModel(prof, TINY).elementwise


def test_elementwise_terms_are_measured_into_a_profile_that_lacks_them(tmp_path, capsys):
    base = tmp_path / "base.json"
    prof = load_profile("cpu-fp32-tiny")
    bare = Profile.from_json({**prof.to_json(), "terms": {k: v for k, v in prof.to_json()["terms"].items()
                                                          if not k.startswith("layer_elementwise")}})
    assert not CostModel(bare, TINY).elementwise
    bare.save(base)
    out = tmp_path / "with.json"
    assert main(["profile", "--from-profile", str(base), "--elementwise-measure", "--layers", "1", "--max-tokens", "128",
                 "--warmup", "0", "--reps", "2", "--passes", "1", "--device", "cpu", "--out", str(out), "--json"]) == 0
    added = Profile.load(out)
    assert added.layer_act_bytes == bare.layer_act_bytes and added.layer_fwd == bare.layer_fwd
    assert added.layer_elementwise_bytes(ChunkShape((96,))) == pytest.approx(96 * (2 * TINY.hidden + TINY.ffn) * 4, rel=0.05)
    assert added.fit_error["elementwise"]["bytes"]["n"] > 0
    assert main(["profile", "--elementwise-measure", "--no-progress"]) == 2
    assert "--from-profile" in capsys.readouterr().err


def test_stack_of_layers_keeps_per_layer_bytes_times_layers_and_the_rope_tables_once():
    shape = ChunkShape((100, 28), prefix=50)
    one = LayerBench(TINY, layers=1, warmup=0, reps=1).saved_bytes(shape)
    three = LayerBench(TINY, layers=3, warmup=0, reps=1).saved_bytes(shape)
    tables = 2 * shape.tokens * TINY.head_dim * 4  # fp32 cos and sin, built once per chunk, shared by its layers
    assert three - tables == 3 * (one - tables)


def test_split_slice_measures_more_memory_than_packed_chunk_of_same_tokens():
    """What the cost model adds for a first slice (its sequence's K/V store) is what the runtime holds."""
    bench = LayerBench(TINY, layers=1, warmup=0, reps=1)
    packed = ChunkShape((128, 64, 64))
    prof, _, _ = profile_device(TINY, layers=1, warmup=0, reps=1, passes=1, progress=False,
                                fit_shapes=fit_grid(256)[:12], held_out=[packed])
    cm = CostModel(prof, TINY)
    split = ChunkShape((128, 64, 64), kept=512)
    assert cm.activation_bytes(split, 1) > cm.activation_bytes(packed, 1)
    assert cm.kv_bytes(split, 1) == 2 * 512 * TINY.kv_dim * 4
    assert bench.saved_bytes(packed) == pytest.approx(cm.layer_act_bytes(packed), rel=0.05)


def test_profile_cli_on_cpu_writes_a_profile_with_held_out_errors(tmp_path, capsys):
    out = tmp_path / "tiny.json"
    assert main(["profile", "--model", "tiny", "--layers", "1", "--max-tokens", "256", "--warmup", "1",
                 "--reps", "2", "--passes", "1", "--no-progress", "--device", "cpu", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["fit_error"]["method"] == "held-out"
    assert summary["fit_error"]["act_bytes"]["max"] < 0.05
    prof = Profile.load(out)
    assert prof.device == "cpu" and prof.dtype == "float32" and prof.torch_version == torch.__version__
    assert prof.model == TINY
    # embedding and head are measured too, and judged on token counts outside their fit
    assert summary["fit_error"]["head_time"]["n"] > 0 and summary["fit_error"]["embed_time"]["n"] > 0
    shape = ChunkShape((200,))
    assert prof.head_fwd(shape) > 0 and prof.head_bwd(shape) > 0 and prof.embed_bwd(shape) > 0


def test_profile_cli_rejects_too_many_layers(capsys):
    assert main(["profile", "--model", "tiny", "--layers", "9", "--no-progress"]) == 2
    assert "--layers" in capsys.readouterr().err


def test_link_fit_recovers_latency_and_bandwidth_and_refuses_noise():
    from infinipipe.contract.layout import LinkModel
    from infinipipe.profiling.links import fit_link

    true = LinkModel(latency_s=50e-6, bandwidth_Bps=2e9)
    fit = fit_link([(b, true.transfer_s(b)) for b in (1e4, 1e6, 8e6)])
    assert (fit.latency_s, fit.bandwidth_Bps) == pytest.approx((true.latency_s, true.bandwidth_Bps))
    assert fit_link([(1e6, 4e-4), (2e6, 9e-4)]).latency_s == 0.0  # a negative intercept is held at 0
    with pytest.raises(ValueError, match="--link-bytes"):
        fit_link([(1e4, 3e-4), (1e6, 2e-4)])


@pytest.mark.slow
def test_profile_links_measures_two_local_processes_into_a_file_plan_reads(tmp_path, capsys):
    from infinipipe.contract.layout import read_links

    out = tmp_path / "links.json"
    assert main(["profile", "--links", "--procs", "2", "--link-bytes", "4KiB,1MiB,8MiB", "--warmup", "1",
                 "--reps", "5", "--out", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["backend"] == "gloo" and shown["processes"] == 2 and "intra-node links" in shown["note"]
    assert set(shown["collectives"]) == {"all_to_all", "all_gather"}
    links = read_links(out)
    assert set(links) == {"intra_node"} and links["intra_node"].bandwidth_Bps > 0
    plan = tmp_path / "plan.json"
    assert main(["plan", "--dist", "github", "--batch", "8", "--max-len", "16384", "--stages", "2", "--sp", "2",
                 "--planner", "gpipe", "--links", str(out), "--out", str(plan)]) == 0
    assert json.loads(plan.read_text())["metadata"]["layout"]["intra_node"] == links["intra_node"].to_json()


def test_per_action_overhead_is_measured_and_added_to_every_action_of_a_stage():
    import dataclasses

    from infinipipe.contract.cost import CostModel, LinearTerm, default_profile
    from infinipipe.contract.model_config import preset
    from infinipipe.contract.shapes import ChunkShape
    from infinipipe.profiling.measure import measure_action_overhead

    prof = default_profile("tiny")
    fwd, bwd = measure_action_overhead(preset("tiny"), "cpu", "float32", prof.layer_fwd, prof.layer_bwd, warmup=1, reps=2)
    assert 0 <= fwd < 50 and 0 <= bwd < 50
    without = dataclasses.replace(prof, action_fwd=LinearTerm({}), action_bwd=LinearTerm({}))
    with_overhead = dataclasses.replace(prof, action_fwd=LinearTerm({"chunk": 1.5}), action_bwd=LinearTerm({"chunk": 2.5}))
    plain, extra = CostModel(without, preset("tiny")), CostModel(with_overhead, preset("tiny"))
    shape = ChunkShape((256, 64))
    for first, last in ((True, False), (False, False), (False, True)):
        assert extra.forward_ms(shape, 2, first, last) - plain.forward_ms(shape, 2, first, last) == pytest.approx(1.5)
        assert extra.backward_ms(shape, 2, first, last) - plain.backward_ms(shape, 2, first, last) == pytest.approx(2.5)


def test_sdpa_fit_recovers_a_fixed_cost_per_packed_sequence():
    """SDPA runs one call per segment, so each sequence packed beside the first costs a fixed
    time; the SDPA fit has a feature for it (flash varlen, one kernel, does not)."""
    from infinipipe.profiling.fit import TIME_FEATURES_FLASH, TIME_FEATURES_SDPA, Measurement, fit_layer

    truth = {"attn": 5e-6, "tokens": 3e-3, "chunk": 0.4, "extra_segments": 0.03}
    shapes = fit_grid(1024)
    rows = [Measurement(s, sum(c * s.features[k] for k, c in truth.items()),
                        2 * sum(c * s.features[k] for k, c in truth.items()), 4000.0 * s.tokens) for s in shapes]
    fitted = fit_layer(rows, time_features=TIME_FEATURES_SDPA, mem_features=("tokens",)).terms
    assert fitted["layer_fwd"].coef["extra_segments"] == pytest.approx(0.03, rel=1e-6)
    assert fitted["layer_bwd"].coef["extra_segments"] == pytest.approx(0.06, rel=1e-6)
    assert "extra_segments" not in TIME_FEATURES_FLASH
    assert ChunkShape((64,) * 16).features["extra_segments"] == 15 and ChunkShape((512,), prefix=64).features[
        "extra_segments"] == 0
