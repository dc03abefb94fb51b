"""The code's layering, checked from its imports (lazy ones inside functions included):
util -> data -> kernels -> stages -> engine -> reporting -> CLI, each importing only its own
layer or lower ones, and no import circle anywhere."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"cascade": "cascade", "cascade.stages": "stages", "cascade.data": "data",
           "cascade.kernels": "kernels"}
ENGINE = {"config", "pipeline", "metrics", "replay", "session", "measure", "experiment",
          "records", "env", "backends"}
REPORTING = {"report", "figures", "compare", "sweep", "ablation"}
LAYERS = {"util": 0, "data": 1, "kernels": 2, "stages": 3, "engine": 4, "reporting": 5, "cli": 6}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "cascade" and parts and parts[0] in ("stages", "data", "kernels"):
                continue
            out[name] = path
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "cli"  # cascade/__init__.py
    second = parts[1]
    if second in ("util", "data", "kernels", "stages"):
        return second
    if second in ("cli", "commands"):
        return "cli"
    if second in ENGINE:
        return "engine"
    if second in REPORTING:
        return "reporting"
    raise AssertionError(f"module {module} has no layer; add it to tests/test_layout.py")


def _imports(path: Path, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n.startswith("cascade"):
                found.add(n)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(p, known) - {m} for m, p in mods.items()}


def test_every_module_has_a_layer(graph):
    for m in graph:
        _layer(m)


def test_imports_point_down_the_layers(graph):
    bad = []
    for m, deps in graph.items():
        for d in deps:
            if d == "cascade" or d.startswith("cascade.") and d.count(".") == 0:
                continue
            if LAYERS[_layer(d)] > LAYERS[_layer(m)]:
                bad.append(f"{m} ({_layer(m)}) imports {d} ({_layer(d)})")
    assert not bad, "\n".join(sorted(bad))


def test_reporting_never_imports_the_runner(graph):
    assert not [m for m, deps in graph.items()
                if _layer(m) == "reporting" and "cascade.experiment" in deps]


def test_no_import_circle(graph):
    # package __init__ files that only re-export are nodes like any other module
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_source_file_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long
