"""The shape of ``backend/``: sub-packages in layers that import only downward, and no import cycle.

Every import counts, those inside functions too: a lazy import that goes upward is still a design cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BACKEND = Path(__file__).resolve().parents[1] / "backend"

# lower imports nothing above it; equal layers do not import each other
LAYERS = {
    "errors": 0,
    "settings": 0,
    "metrics": 0,
    "rules": -1,  # below settings, which validates COSOD_GROUP_BY with it
    "grouping": 1,
    "labelstudio": 2,
    "learning": 3,
    "prediction": 4,
    "jobs": 5,
    "api": 6,
}
MAX_LINES = 430  # "about 400 unless cohesion demands"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(BACKEND.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The backend modules ``path`` imports, anywhere in the file (``from .x import y`` counts ``x.y``
    when that is a module)."""
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("backend"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if _exists(sub) else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("backend"))
    return out


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (BACKEND / rel).with_suffix(".py").exists() or (BACKEND / rel / "__init__.py").exists()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(BACKEND.rglob("*.py"))}


def _layer(module: str) -> tuple[str, int]:
    top = module.split(".")[1] if "." in module else "backend"
    return top, LAYERS.get(top, -1)


def test_every_part_of_backend_has_a_layer() -> None:
    tops = {_layer(m)[0] for m in _graph() if m != "backend"}
    assert tops <= set(LAYERS), f"new sub-packages or modules need a layer: {sorted(tops - set(LAYERS))}"


def test_sub_packages_import_only_downward() -> None:
    wrong = []
    for module, targets in _graph().items():
        if module == "backend":
            continue
        top, layer = _layer(module)
        for target in targets:
            ttop, tlayer = _layer(target)
            if ttop != top and tlayer >= layer:
                wrong.append(f"{module} ({top}, layer {layer}) imports {target} ({ttop}, layer {tlayer})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, " -> ".join(cycle)


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "backend"
    (fake / "labelstudio").mkdir(parents=True)
    (fake / "jobs").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "labelstudio" / "__init__.py").write_text("")
    (fake / "jobs" / "__init__.py").write_text("")
    (fake / "labelstudio" / "a.py").write_text("def f():\n    from ..jobs import b\n")
    (fake / "jobs" / "b.py").write_text("from ..labelstudio import a\n")
    monkeypatch.setattr(__import__(__name__), "BACKEND", fake)
    with pytest.raises(AssertionError, match="labelstudio.a .* imports backend.jobs.b"):
        test_sub_packages_import_only_downward()
    with pytest.raises(AssertionError, match="backend.jobs.b -> backend.labelstudio.a -> backend.jobs.b"):
        test_no_import_cycle()


def test_modules_stay_small() -> None:
    long = {
        _module_name(p): n
        for p in BACKEND.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long
