"""The package's floors: each package imports only the floors below it, and the planning side
(contract, simulator, planners) runs in a process that cannot import torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "infinipipe"

# What each package may import besides itself: every arrow points down, so the map is a DAG.
ALLOWED = {
    "contract": set(),
    "sim": {"contract"},
    "model": {"contract"},
    "planners": {"contract", "sim"},
    "config": {"contract", "model", "planners"},
    "data": {"config"},
    "runtime": {"contract", "model", "config"},
    "profiling": {"contract", "model", "runtime"},
    "train": {"contract", "sim", "model", "planners", "config", "data", "runtime", "profiling"},
    "commands": {"contract", "sim", "model", "planners", "config", "data", "runtime", "profiling", "train"},
    "cli": {"commands"},
}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[str, int]]:
    """Absolute ``infinipipe.*`` modules ``path`` imports (lazy and type-only imports included)."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    here = list(rel.parts) if path.name == "__init__.py" else list(rel.parts[:-1])
    if path.name == "__init__.py":
        here = here[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]  # a name may be a submodule
            out += [(n, node.lineno) for n in names if n.startswith("infinipipe")]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("infinipipe")]
    return out


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_allowed_map_has_no_cycles():
    seen: dict[str, int] = {}

    def visit(pkg: str) -> None:
        assert seen.get(pkg) != 1, f"package cycle through {pkg}"
        if seen.get(pkg) == 2:
            return
        seen[pkg] = 1
        for dep in ALLOWED[pkg]:
            visit(dep)
        seen[pkg] = 2

    for pkg in ALLOWED:
        visit(pkg)


def test_every_import_points_down_a_floor():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        source = _package(_module(path))
        if source == "__init__":
            continue
        assert source in ALLOWED, f"{path.relative_to(SRC)}: package {source!r} has no floor in ALLOWED"
        for target, line in _imports(path):
            dest = _package(target)
            if dest not in (source, "__init__") and dest not in ALLOWED[source]:
                wrong.append(f"{path.relative_to(SRC)}:{line} imports {target} ({source} -> {dest})")
    assert not wrong, "upward or sideways imports:\n" + "\n".join(wrong)


def test_no_module_import_cycles():
    modules = {_module(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        graph[mod] = set()
        for target, _ in _imports(path):
            while target not in modules:  # "pkg.module.Name" -> "pkg.module"
                target = target.rpartition(".")[0]
            if target != mod:
                graph[mod].add(target)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            if not dep.startswith(m + "."):  # a package importing its own submodules is no cycle
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        visit(m)


BLOCK_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked here ({name})")
sys.meta_path.insert(0, NoTorch())
"""

PLAN_WITHOUT_TORCH = BLOCK_TORCH + """
from infinipipe.contract.cost import CostModel, default_profile
from infinipipe.contract.model_config import preset
from infinipipe.planners.compare import compare_planners
from infinipipe.profiling.fit import fit_layer
cost = CostModel(default_profile("llama-7b"), preset("llama-7b"))
rows = compare_planners(cost, [32768, 9000, 4000, 2000, 700, 300], 4, 80 * 2**30, ["epp", "seq1f1b"])
assert all(r["planned"] and r["feasible"] for r in rows.values()), rows
assert "torch" not in sys.modules
print("planned without torch")
"""


def test_contract_planners_and_simulator_run_with_torch_blocked():
    done = subprocess.run([sys.executable, "-c", PLAN_WITHOUT_TORCH], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "planned without torch" in done.stdout


def test_the_torch_blocker_does_block_torch():
    done = subprocess.run([sys.executable, "-c", BLOCK_TORCH + "import infinipipe.model.layers"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "torch is blocked here" in done.stderr


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_every_floor_exists(package):
    assert (SRC / f"{package}.py").exists() or (SRC / package / "__init__.py").exists()
