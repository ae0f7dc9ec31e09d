"""The Slurm launch script beside the multi-node example parses, and starts the torchrun command
the README documents (what a CPU can check: no Slurm here)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "llama13b-4node.slurm"


def test_slurm_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_slurm_script_builds_the_readmes_torchrun_command_for_two_nodes():
    env = {**os.environ, "DRY_RUN": "1", "HEAD_NODE": "node-a", "SLURM_NNODES": "2", "SLURM_JOB_ID": "77"}
    out = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    documented = re.search(r"^(torchrun --nnodes=\$SLURM_NNODES .*)$", (ROOT / "README.md").read_text(), re.M).group(1)
    for name, value in (("SLURM_NNODES", "2"), ("HEAD_NODE", "node-a"), ("SLURM_JOB_ID", "77")):
        documented = documented.replace(f"${name}", value)
    assert shlex.split(out) == shlex.split(documented)


def test_slurm_script_asks_for_the_stop_ahead_of_the_time_limit_beyond_the_stop_grace():
    from infinipipe.config import load_config

    lead = int(re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", SCRIPT.read_text(), re.M).group(1))
    assert lead > load_config(ROOT / "examples" / "llama13b-4node.toml").job.stop_grace_seconds + 60
