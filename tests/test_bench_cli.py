"""`infinipipe bench` compares every planner on one batch and labels the figures as simulated."""
from __future__ import annotations

import json

from infinipipe.cli import main


def test_bench_prints_every_planner_simulated_on_the_committed_profile(capsys):
    args = ["bench", "--model", "llama-7b", "--stages", "2", "--batch", "16", "--max-len", "16384"]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["simulated"] is True and out["profile"] == "h100-bf16-llama-7b"
    assert set(out["rows"]) == {"epp", "seq1f1b", "seq1f1b-balanced", "batch-1f1b", "gpipe", "epp-uniform"}
    assert out["rows"]["epp"]["planned"] and out["rows"]["epp"]["feasible"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.startswith("SIMULATED") and "epp speedup" in text


def test_bench_costs_every_planner_on_the_layout_given(capsys):
    args = ["bench", "--model", "llama-7b", "--stages", "2", "--batch", "8", "--max-len", "16384", "--json"]
    assert main(args) == 0
    alone = json.loads(capsys.readouterr().out)
    assert main([*args, "--sp", "4", "--inter-node-gbps", "400"]) == 0
    sharded = json.loads(capsys.readouterr().out)
    assert sharded["layout"]["sp"] == 4 and sharded["layout"]["inter_node"]["bandwidth_Bps"] == 50e9
    assert max(sharded["rows"]["gpipe"]["peak_memory_bytes"]) < max(alone["rows"]["gpipe"]["peak_memory_bytes"])
