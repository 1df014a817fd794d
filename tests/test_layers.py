"""The house's layers, read from the source: adapters <- train <- server <- bench, cli; inside server, the API
process (server/api) and the worker (server/worker) meet only in server/jobs.py and server/settings.py, and in
the one place where the API process assembles the server with the worker's LitAPI (api/app.py -> worker/api.py);
server/cluster (Ray Serve) sits above the API process: it runs whole servers and never reaches into a worker.
No import cycles between modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {
    "loraswap.adapters": "adapters",
    "loraswap.train": "train",
    "loraswap.server": "server",
    "loraswap.bench": "bench",
}
LAYER = {"adapters": 0, "train": 1, "server": 2, "bench": 3, "cli": 3}


def _modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([prefix, *parts])] = path
    for path in (ROOT / "cli").rglob("*.py"):
        rel = path.relative_to(ROOT / "cli").with_suffix("")
        found[".".join(["loraswap", *[p for p in rel.parts if p != "__init__"]])] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every loraswap module `path` imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        out |= {n for n in names if n in MODULES}
    return out


def _room(module: str) -> str:
    for prefix, folder in FOLDERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return folder
    return "cli"


def _side(module: str) -> str | None:
    for side in ("api", "worker", "cluster"):
        if module.startswith(f"loraswap.server.{side}"):
            return side
    return None


GRAPH = {m: _imports(p) - {m} for m, p in MODULES.items()}


def test_the_modules_were_found() -> None:
    assert {"loraswap.server.jobs", "loraswap.server.api.app", "loraswap.server.worker.engine", "loraswap.main"} <= set(
        MODULES
    )
    assert "loraswap.server.worker.slots" in GRAPH["loraswap.server.worker.residency"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_a_lower_layer_to_a_higher_one(module: str) -> None:
    upward = [m for m in GRAPH[module] if LAYER[_room(m)] > LAYER[_room(module)]]
    assert not upward, f"{module} ({_room(module)}) imports {upward}"


def test_the_two_processes_meet_only_in_jobs_and_settings() -> None:
    crossing = sorted(
        (m, other)
        for m, deps in GRAPH.items()
        for other in deps
        if _side(m) and _side(other) and _side(m) != _side(other) and (_side(m), _side(other)) != ("cluster", "api")
    )
    assert crossing == [("loraswap.server.api.app", "loraswap.server.worker.api")]
    shared = {m for m in MODULES if m.startswith("loraswap.server.") and _side(m) is None}
    assert shared == {"loraswap.server.jobs", "loraswap.server.settings"}
    for module in shared:  # both sides import them: neither imports a side
        assert not {d for d in GRAPH[module] if _side(d)}, module


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                cycle = [*path[path.index(d) :], d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
