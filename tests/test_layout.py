"""The package layout is the architecture: no import cycle, no import from a higher floor, small
modules. Imports inside functions count: a cycle hidden in a function is still a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "labkit"
MAX_LINES = 350

# Floors, ground first: a module may import from its own floor or a lower one, never a higher.
FLOORS = [
    {"config", "device", "models", "metrics", "processes"},
    {"engines"},
    {"profiling", "roofline", "quant", "quant_methods", "sizes", "quality", "equivalence", "plots",
     "widgets", "prune", "claims", "records", "quiz"},
    {"serving"},
    {"bench"},
    {"course"},
    {"cli", "doctor"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """labkit modules imported anywhere in ``path`` (module level, in functions, relative)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    return imports_in(path.read_text(), me, package, known)


def imports_in(source: str, me: str, package: str, known: set[str]) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != me and name != "labkit":
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(p, set(mods)) for m, p in mods.items()}


def floor(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(FLOORS):
        if part in names:
            return i
    raise AssertionError(f"{module} is on no floor of the layout; add it to FLOORS")


def test_every_module_is_on_a_floor():
    for m in modules():
        if m != "labkit":
            floor(m)


def test_no_module_imports_from_a_higher_floor():
    bad = [f"{a} (floor {floor(a)}) imports {b} (floor {floor(b)})"
           for a, deps in graph().items() if a != "labkit"
           for b in deps if floor(b) > floor(a)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_modules_are_small():
    big = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_the_checker_sees_function_level_and_relative_imports():
    """The graph would be worthless if it missed imports inside functions or relative ones."""
    source = ("def f():\n    from labkit.serving import service\n    import labkit.bench.loadgen\n"
              "    from ..metrics import stats\n    from . import client\n")
    got = imports_in(source, "labkit.bench.serve", "labkit.bench", set(modules()))
    # ``from labkit.serving import service`` runs the package's __init__ too: both count.
    assert got == {"labkit.serving", "labkit.serving.service", "labkit.bench.loadgen",
                   "labkit.metrics", "labkit.bench", "labkit.bench.client"}
