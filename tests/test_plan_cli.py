import dataclasses
import json

import pytest

from infinipipe.cli import main
from infinipipe.commands.plan import parse_bytes
from infinipipe.contract.ir import Plan, validate_plan
from test_simulator import h100_like_cost


@pytest.fixture
def profile_file(tmp_path):
    path = tmp_path / "profile.json"
    h100_like_cost().profile.save(path)
    return path


def test_plan_from_a_lengths_file_then_simulate_with_json_and_chart(tmp_path, profile_file, capsys):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("40000\n9000\n3000\n3000\n500\n")
    out = tmp_path / "plan.json"
    assert main(["plan", "--lengths", str(lengths), "--model", "llama-7b", "--profile", str(profile_file),
                 "--stages", "4", "--memory-budget", "80GiB", "--planner", "seq1f1b",
                 "--option", "chunk_tokens=8192", "--out", str(out)]) == 0
    plan = Plan.loads(out.read_text())
    validate_plan(plan)
    assert plan.seq_lengths == (40000, 9000, 3000, 3000, 500)
    assert plan.metadata["planner"] == "seq1f1b" and plan.metadata["memory_budget"] == 80 * 2**30
    capsys.readouterr()
    chart = tmp_path / "gantt.png"
    assert main(["simulate", str(out), "--json", "--chart", str(chart)]) == 0
    figures = json.loads(capsys.readouterr().out)
    for key in ("planner", "iteration_time_s", "bubble_ratio", "recompute_time_s", "feasible",
                "peak_memory_bytes", "num_chunks", "num_pipelines"):
        assert key in figures
    assert figures["simulated"] is True and len(figures["peak_memory_bytes"]) == 4
    assert figures["num_chunks"] == len(plan.chunks)
    assert chart.read_bytes()[:4] == b"\x89PNG"


def test_plan_from_a_named_distribution_and_human_summary(tmp_path, profile_file, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--dist", "github", "--batch", "32", "--max-len", "32768", "--model", "llama-7b",
                 "--profile", str(profile_file), "--stages", "2", "--planner", "batch-1f1b",
                 "--out", str(out)]) == 0
    assert len(Plan.loads(out.read_text()).seq_lengths) == 32
    assert main(["simulate", str(out), "--memory-budget", "1GiB"]) == 0
    text = capsys.readouterr().out
    assert "SIMULATED" in text and "OUT OF MEMORY" in text


def test_bad_input_exits_with_a_clear_error(tmp_path, profile_file, capsys):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("100\n")
    code = main(["plan", "--lengths", str(lengths), "--model", "llama-7b", "--profile", str(profile_file),
                 "--stages", "2", "--memory-budget", "eighty", "--planner", "gpipe", "--out", str(tmp_path / "p.json")])
    assert code == 2 and "--memory-budget" in capsys.readouterr().err
    code = main(["plan", "--lengths", str(lengths), "--model", "llama-13b", "--profile", str(profile_file),
                 "--stages", "2", "--planner", "gpipe", "--out", str(tmp_path / "p.json")])
    assert code == 2 and "profile" in capsys.readouterr().err


@pytest.mark.parametrize("text,value", [("80GiB", 80 * 2**30), ("40GB", 40 * 10**9), ("1024", 1024),
                                        ("1.5 KiB", 1536)])
def test_memory_sizes_parse(text, value):
    assert parse_bytes(text) == value


def test_explain_lists_every_candidate_and_names_the_winner(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["plan", "--dist", "github", "--batch", "64", "--max-len", "32768", "--model", "llama-7b",
                 "--stages", "4", "--out", str(out), "--explain"]) == 0
    text = capsys.readouterr().out
    plan = json.loads(out.read_text())
    tried = plan["metadata"]["search"]
    assert f"{len(tried)} candidate plans tried" in text
    assert all(t["candidate"] in text for t in tried)
    assert f"chosen: {plan['metadata']['chosen']}" in text and "<- chosen" in text


def test_explain_names_the_slice_counts_the_k_ladder_left_out_and_why(tmp_path, capsys):
    """The planning benchmark's batch: the K ladder stops once lines through its rungs put every
    larger K behind the leader; those counts are named, never planned, with the bound that cut them
    (the winner's reorderings, which come after the ladder, are left out)."""
    out = tmp_path / "p.json"
    assert main(["plan", "--dist", "github", "--batch", "512", "--max-len", "131072", "--model", "llama-7b",
                 "--stages", "8", "--out", str(out), "--explain", "--option", "deadline_share=0",
                 "--option", "timed_orders=false"]) == 0
    text = capsys.readouterr().out
    meta = json.loads(out.read_text())["metadata"]
    skipped, tried = meta["search_skipped"], {t["candidate"].split(" cap=")[0] for t in meta["search"]}
    assert skipped
    for s in skipped:
        assert s["floor_s"] >= s["leader_s"] and s["candidate"] not in tried
        assert f"{s['candidate']} " in text and "not planned" in text


def test_plan_needs_no_model_and_takes_llama_7b_with_its_committed_profile(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--dist", "github", "--stages", "4", "--batch", "32", "--out", str(out)]) == 0
    plan = Plan.loads(out.read_text())
    assert plan.metadata["profile"] == "h100-bf16-llama-7b" and plan.metadata["model"]["hidden"] == 4096
    assert "epp for llama-7b with profile h100-bf16-llama-7b" in capsys.readouterr().err


def test_hf_folder_plans_and_simulates_on_the_profile_of_its_shape_whatever_its_eps_and_rope_base(tmp_path, capsys):
    from infinipipe.contract.model_config import preset
    from infinipipe.model.hf import config_to_hf

    folder = tmp_path / "hf-model"
    folder.mkdir()
    shape = dataclasses.replace(preset("llama-7b"), norm_eps=1e-6, rope_theta=500000.0)
    (folder / "config.json").write_text(json.dumps(config_to_hf(shape)))
    out = tmp_path / "plan.json"
    assert main(["plan", "--hf-path", str(folder), "--dist", "github", "--stages", "4", "--batch", "32",
                 "--out", str(out)]) == 0
    plan = Plan.loads(out.read_text())
    assert plan.metadata["profile"] == "h100-bf16-llama-7b" and plan.metadata["model"]["norm_eps"] == 1e-6
    capsys.readouterr()
    assert main(["simulate", str(out), "--hf-path", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["feasible"] is True
    assert main(["bench", "--hf-path", str(folder), "--stages", "2", "--batch", "16", "--max-len", "16384",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["profile"] == "h100-bf16-llama-7b"


def test_layout_options_reach_the_plan_and_simulate_reads_them_back(tmp_path, profile_file, capsys):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("40000\n9000\n3000\n3000\n500\n")
    common = ["plan", "--lengths", str(lengths), "--model", "llama-7b", "--profile", str(profile_file),
              "--stages", "4", "--planner", "gpipe"]
    alone, sharded = tmp_path / "alone.json", tmp_path / "sharded.json"
    assert main([*common, "--out", str(alone)]) == 0
    assert main([*common, "--sp", "2", "--dp-shard", "2", "--gpus-per-node", "4", "--intra-node-gbps", "800",
                 "--out", str(sharded)]) == 0
    assert "layout: sp 2, parameters sharded over 4 rank(s), 1 replica(s), 4 GPUs per node; intra-node 800 Gbit/s" \
        in capsys.readouterr().err
    layout = Plan.loads(sharded.read_text()).metadata["layout"]
    assert (layout["sp"], layout["fsdp"], layout["gpus_per_node"]) == (2, 4, 4)
    assert layout["intra_node"]["bandwidth_Bps"] == 100e9

    def figures(*extra: str) -> dict:
        assert main(["simulate", *extra, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    one, two = figures(str(alone)), figures(str(sharded))
    assert two["layout"] == layout and one["layout"]["sp"] == 1
    assert all(b < a for a, b in zip(one["peak_memory_bytes"], two["peak_memory_bytes"]))
    assert figures(str(sharded), "--sp", "1")["layout"]["fsdp"] == 2  # dp-shard 2 kept from the plan


@pytest.mark.parametrize("flags, message", [
    (["--sp", "0"], "--sp must be >= 1, got 0"),
    (["--dp-shard", "-1"], "--dp-shard must be >= 1"),
    (["--gpus-per-node", "0"], "--gpus-per-node must be >= 1"),
    (["--inter-node-gbps", "0"], "--inter-node-gbps must be > 0"),
    (["--intra-node-latency-us", "-5"], "--intra-node-latency-us must be >= 0"),
    (["--sp", "64"], "--sp 64 exceeds the model's 32 attention heads"),
    (["--links", "missing-links.json"], "links file missing-links.json"),
])
def test_bad_layout_options_exit_2_naming_the_flag(tmp_path, profile_file, capsys, flags, message):
    for command in (["plan", "--dist", "github", "--batch", "4", "--model", "llama-7b", "--profile", str(profile_file),
                     "--stages", "2", "--planner", "gpipe", "--out", str(tmp_path / "p.json")],
                    ["bench", "--model", "llama-7b", "--stages", "2", "--batch", "4"]):
        assert main([*command, *flags]) == 2
        assert message in capsys.readouterr().err


def test_explain_lists_the_candidates_also_when_none_fits(tmp_path, capsys):
    """Between the memory lower bound and the frugal plan's peak, the search runs, finds nothing,
    prints what it tried, and the error names the bound and the budget from which EPP plans."""
    from infinipipe.contract.cost import CostModel, default_profile
    from infinipipe.contract.model_config import preset
    from infinipipe.planners.bound import memory_lower_bound
    from infinipipe.planners.request import PlanRequest

    sizes = [8192, 8192, 3000, 2000, 1000, 500]
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("\n".join(map(str, sizes)) + "\n")
    cost = CostModel(default_profile("tiny"), preset("tiny"))
    bound = memory_lower_bound(cost, PlanRequest(sizes, cost, 4, 1e12).layers, sizes)
    code = main(["plan", "--lengths", str(lengths), "--model", "tiny", "--stages", "4",
                 "--memory-budget", str(int(bound.bytes * 1.05)), "--out", str(tmp_path / "p.json"), "--explain"])
    captured = capsys.readouterr()
    assert code == 2 and not (tmp_path / "p.json").exists()
    assert "candidate plans tried (0 fit)" in captured.out and "no candidate fits" in captured.out
    assert "any plan needs at least" in captured.err and "epp plans it from" in captured.err
