"""The layers cli → flows → tasks → metareward, and inside metareward its packages from the bottom up, read from every
import (function-level ones too): no import runs back up a layer, no import cycle, no Prefect in the library, no module
over ~400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYERS = {"metareward": 0, "tasks": 1, "flows": 2, "cli": 3}
PACKAGES = {"config": 0, "artifacts": 0, "host": 0, "paper": 1, "inference": 2, "training": 2, "placement": 3,
            "pipeline": 4, "tracking": 5, "preflight": 6}
"""metareward's packages by rank: a module may import its own package and packages of a lower rank, never one of
the same rank (two rooms side by side know nothing of each other) or above. preflight checks everything before a
campaign starts, so it sits on top."""
MAX_LINES = 420


def modules() -> dict[str, Path]:
    found = {}
    for package in LAYERS:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The project modules a module imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    resolved = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def test_imports_only_go_down_the_layers_and_the_library_has_no_prefect():
    known = modules()
    problems = []
    for name, path in known.items():
        layer = LAYERS[name.split(".")[0]]
        for target in imports(path, name, known):
            if LAYERS[target.split(".")[0]] > layer:
                problems.append(f"{name} imports {target}")
        if name.startswith("metareward") and ("import prefect" in path.read_text()
                                              or "from prefect" in path.read_text()):
            problems.append(f"{name} imports prefect")
    assert not problems


def package_of(name: str) -> str:
    """The metareward package a library module belongs to (`metareward.paper.elo` → paper)."""
    return name.split(".")[1]


def test_library_packages_import_only_packages_below_them():
    known = {name: path for name, path in modules().items() if name.startswith("metareward.")}
    assert {package_of(name) for name in known} == set(PACKAGES), "a new package needs a rank in PACKAGES"
    problems = []
    for name, path in known.items():
        package = package_of(name)
        for target in imports(path, name, known):
            other = package_of(target)
            if other != package and PACKAGES[other] >= PACKAGES[package]:
                problems.append(f"{name} ({package}, rank {PACKAGES[package]}) imports {target} "
                                f"({other}, rank {PACKAGES[other]})")
    assert not problems


def test_library_holds_packages_not_loose_modules():
    loose = sorted(path.name for path in (REPO / "metareward").glob("*.py"))
    assert loose == ["__init__.py", "preflight.py"]


def test_no_import_cycle():
    known = modules()
    graph = {name: imports(path, name, known) for name, path in known.items()}
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in graph[node]:
            if state.get(target) == "open":
                cycles.append(" → ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert not cycles


def test_no_module_over_the_size_limit():
    assert not [f"{path.relative_to(REPO)}: {lines} lines" for path in modules().values()
                if (lines := len(path.read_text().splitlines())) > MAX_LINES]
