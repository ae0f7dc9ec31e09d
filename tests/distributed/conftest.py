import pytest

from infinipipe.runtime.nccl_semantics import ENV_VAR


@pytest.fixture(autouse=True)
def nccl_semantics(monkeypatch):
    """Multi-process tests run their P2P under NCCL's waiting rules (ranks inherit the variable)."""
    monkeypatch.setenv(ENV_VAR, "1")
