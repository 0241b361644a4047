"""The shape of deployments/ (docs/architecture.md): one folder per process, imports that only run down.

Read from the code itself: every ``import``/``from`` of a deployments module (at the top or inside a function)
is an edge; the package's graph has no cycle, and the processes' folders keep their direction. Two imports are
run for real, in a fresh interpreter: the request core pulls in no FastAPI/Starlette, and the GPU process (the
Generator's module) and the FaceAnalyzer's pull in nothing of the Ingress (its HTTP edge, schemas, jobs)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "deployments"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The deployments modules that ``path`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def test_the_graph_is_read():
    """Known edges are found (a reader that finds nothing would pass every rule below)."""
    g = graph()
    assert "deployments.ingress.service" in g["deployments.ingress.http.app"]
    assert "deployments.ingress.jobs.service" in g["deployments.ingress.service"]
    assert "deployments.messages" in g["deployments.generator.deployment"]


def test_no_import_cycle_in_deployments():
    g = graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [])


# folder -> the deployments folders it must never import (each process's folder, and the layers of the Ingress)
NEVER = {
    "deployments.generator": ("deployments.ingress", "deployments.face_analyzer"),
    "deployments.face_analyzer": ("deployments.ingress", "deployments.generator"),
    "deployments.ingress.jobs": ("deployments.ingress.http", "deployments.ingress.service",
                                 "deployments.ingress.deployment"),
    "deployments.ingress.http": ("deployments.ingress.deployment",),
}
# the request core (everything of ingress/ but its deployment and HTTP edge) never imports the edge
CORE = ("deployments.ingress.service", "deployments.ingress.context", "deployments.ingress.inputs",
        "deployments.ingress.people", "deployments.ingress.controls", "deployments.ingress.backends",
        "deployments.ingress.delivery", "deployments.ingress.identities", "deployments.ingress.identity_score",
        "deployments.ingress.schemas")


def test_imports_run_down_between_the_folders():
    g = graph()
    bad = []
    rules = {**NEVER, **{m: ("deployments.ingress.http", "deployments.ingress.deployment") for m in CORE}}
    for module, targets in g.items():
        for owner, never in rules.items():
            if module == owner or module.startswith(owner + "."):
                bad += [f"{module} -> {t}" for t in targets if any(t == n or t.startswith(n + ".") for n in never)]
    # the shared leaves at the bottom import no process folder
    for leaf in ("deployments.config", "deployments.errors", "deployments.messages", "deployments.metrics",
                 "deployments.ray_compat"):
        bad += [f"{leaf} -> {t}" for t in g[leaf]
                if t.startswith(("deployments.ingress", "deployments.generator", "deployments.face_analyzer"))]
    assert not bad, bad


def _modules_after_import(module: str) -> list[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_the_request_core_imports_no_fastapi_or_starlette():
    """docs/architecture.md: the service is plain Python; the HTTP edge is the only FastAPI user."""
    loaded = _modules_after_import("deployments.ingress.service")
    assert "deployments.ingress.jobs.service" in loaded  # the job core is part of it, and imported here
    assert not [m for m in loaded if m.startswith(("fastapi", "starlette"))]


@pytest.mark.parametrize("module", ["deployments.generator.deployment", "deployments.face_analyzer.deployment"])
def test_the_backend_processes_import_nothing_of_the_ingress(module):
    """The GPU process (and the face group) never load the HTTP edge, its schemas or the job core."""
    loaded = _modules_after_import(module)
    assert module in loaded
    assert not [m for m in loaded if m.startswith("deployments.ingress")]
