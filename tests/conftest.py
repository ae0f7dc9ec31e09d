import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts) spreads a run of folders over the cores; a run of named
    files or tests stays in this process, where starting workers (each imports torch) costs
    more than it saves."""
    if any((config.invocation_params.dir / arg.split("::")[0]).is_file() for arg in config.args):
        return 0
    return None  # xdist's count: one worker per core, capped by --maxprocesses
