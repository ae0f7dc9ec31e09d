"""`infinipipe bench` compares every planner on one batch and labels the figures as simulated."""
from __future__ import annotations

import json
import re

from infinipipe.cli import main
from infinipipe.commands.plan import with_layout
from infinipipe.contract.cost import CostModel, load_profile
from infinipipe.contract.layout import StageLayout
from infinipipe.contract.model_config import preset
from infinipipe.contract.units import GIB
from infinipipe.data.lengths import sample_lengths
from infinipipe.planners.registry import SP_PLANNERS


def test_bench_prints_every_planner_simulated_on_the_committed_profile(capsys):
    args = ["bench", "--model", "llama-7b", "--stages", "2", "--batch", "16", "--max-len", "16384"]
    # Without a deadline: each search then gets as far as it can, so the unlimited-memory one, which
    # could plan anything the budgeted one did, is no slower (under a deadline the load decides).
    assert main(args + ["--json", "--option", "deadline_share=0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["simulated"] is True and out["profile"] == "h100-bf16-llama-7b"
    assert set(out["rows"]) == {"epp", "epp (no host tier)", "epp (unlimited memory)", "seq1f1b", "seq1f1b-balanced",
                                "batch-1f1b", "gpipe", "epp-uniform"}
    assert out["rows"]["epp"]["planned"] and out["rows"]["epp"]["feasible"]
    assert out["rows"]["epp (unlimited memory)"]["iteration_time_s"] <= out["rows"]["epp"]["iteration_time_s"] * (1 + 1e-9)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.startswith("SIMULATED") and "host tier 128GiB per device" in text and "epp speedup" in text
    assert re.search(r"^  host tier: ([\d,]+ GiB offloaded|off)", text, re.M)
    split = re.search(r"^  epp bubble (\d+\.\d)%: (\d+\.\d)% stage imbalance \(stage \d+ .*\), (\d+\.\d)% the schedule's",
                      text, re.M)
    assert split and abs(float(split[1]) - float(split[2]) - float(split[3])) <= 0.11
    assert re.search(r"^  epp planning: \d+\.\d\ds MEASURED here \((deadline \d+\.\d\ds, \d+ candidate\(s\) skipped "
                     r"for time|no deadline), (no|\d+) pool processes\)$", text, re.M)


def test_bench_costs_every_planner_on_the_layout_given(capsys):
    args = ["bench", "--model", "llama-7b", "--stages", "2", "--batch", "8", "--max-len", "16384", "--json"]
    assert main(args) == 0
    alone = json.loads(capsys.readouterr().out)
    assert main([*args, "--sp", "4", "--inter-node-gbps", "400"]) == 0
    sharded = json.loads(capsys.readouterr().out)
    assert sharded["layout"]["sp"] == 4 and sharded["layout"]["inter_node"]["bandwidth_Bps"] == 50e9
    assert max(sharded["rows"]["gpipe"]["peak_memory_bytes"]) < max(alone["rows"]["gpipe"]["peak_memory_bytes"])


def test_bench_with_sp_adds_ulysses_and_flexsp_on_the_same_gpus_batch_and_simulator(capsys):
    args = ["bench", "--model", "llama-7b", "--stages", "2", "--batch", "8", "--max-len", "16384"]
    assert main([*args, "--sp", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cost = with_layout(CostModel(load_profile(out["profile"]), preset("llama-7b")), StageLayout(sp=2, fsdp=2))
    lengths = sample_lengths("github", 8, 16384, 0)
    for name in ("ulysses", "flexsp"):
        row, plan = out["rows"][name], SP_PLANNERS[name](cost, lengths, 4, 80 * GIB)
        assert row["planned"] and row["gpus"] == 4  # stages x sp
        assert row["iteration_time_s"] == plan.iteration_time_s and row["feasible"] == plan.feasible
    assert out["rows"]["ulysses"]["groups"] == [{"sp": 4, "sequences": 8,
                                                 "iteration_time_s": out["rows"]["ulysses"]["iteration_time_s"]}]
    assert main([*args, "--sp", "2"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^  ulysses +\d+\.\d\ds", text, re.M) and re.search(r"^  flexsp +\d+\.\d\ds", text, re.M)
    assert "ulysses and flexsp: no pipeline, the same 4 GPUs (stages x sp) on the same batch" in text


def test_bench_runs_the_sp_baselines_without_sp_only_when_asked_and_names_why_ulysses_cannot_plan(capsys):
    args = ["bench", "--model", "llama-7b", "--stages", "2", "--batch", "8", "--max-len", "16384", "--json"]
    assert main(args) == 0
    assert not {"ulysses", "flexsp"} & set(json.loads(capsys.readouterr().out)["rows"])
    assert main([*args, "--sp-baselines"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows["ulysses"]["gpus"] == rows["flexsp"]["gpus"] == 2
    assert main([*args, "--sp", "32"]) == 0  # 64 GPUs, more than llama-7b's 32 heads
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert not rows["ulysses"]["planned"] and "exceeds the model's 32 attention heads" in rows["ulysses"]["error"]
    assert rows["flexsp"]["planned"] and max(g["sp"] for g in rows["flexsp"]["groups"]) <= 32


def test_bench_without_the_host_tier_plans_as_before_and_a_host_budget_the_host_lacks_is_refused(capsys):
    args = ["bench", "--model", "llama-7b", "--stages", "2", "--batch", "8", "--max-len", "16384", "--json"]
    assert main([*args, "--host-memory-budget", "0"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert "epp (no host tier)" not in rows and not any(rows["epp"]["offloaded_bytes"])
    assert main([*args, "--host-memory-budget", "300GiB"]) == 2
    err = capsys.readouterr().err
    assert "--host-memory-budget 300GiB (322122547200 bytes) is more than the 274877906944 bytes" in err


def test_the_memory_bound_bench_prints_counts_the_host_tier_and_names_the_bound_without_it(capsys):
    """With the host tier the optimizer state leaves the device during the step, so the bound is
    the one a plan that offloads must meet; the bound without the tier is printed beside it."""
    args = ["bench", "--model", "llama-30b", "--stages", "8", "--batch", "8", "--max-len", "8192",
            "--option", "deadline_share=0"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memory_lower_bound"] < out["memory_lower_bound_without_host_tier"]
    assert main([*args, "--host-memory-budget", "0", "--json"]) == 0
    off = json.loads(capsys.readouterr().out)
    assert off["memory_lower_bound"] == off["memory_lower_bound_without_host_tier"] == out["memory_lower_bound_without_host_tier"]
    assert main(args) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  memory: "))
    assert f"; without the host tier, {out['memory_lower_bound_without_host_tier'] / GIB:.2f} GiB" in line
