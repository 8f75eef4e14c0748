"""Find code in a submission that reaches for the grader instead of solving the exercise.

The grader's hidden tests and recomputations run inside the student's kernel (see
``labkit.course.grading``), so a student's code can in principle replace what they call: shadow
``exec``, patch IPython's display publisher, start a process that outlives the kernel and edits
the grade file. ``scan(source)`` reads a cell's code (without running it) and names every such
reach: it is a list of patterns, not a sandbox, and the rubric README says so. Cells the student
did not change are not scanned; a flagged submission is not run and scores zero with the findings as
its reason, for an instructor to look at.
"""

from __future__ import annotations

import ast
import re

from labkit.records import GRADER_KEY, GRADER_PREFIX

# Names the grader's cells resolve in the student's namespace: rebinding them is never needed.
GRADER_NAMES = {"exec", "eval", "compile", "__import__", "__builtins__", "builtins",
                "get_ipython", "globals"}
# Modules whose attributes the grader or the kernel rely on: assigning into them is tampering.
PROTECTED_MODULES = {"builtins", "__builtins__", "json", "labkit", "IPython", "sys", "os",
                     "papermill", "nbformat", "ipykernel"}
PROTECTED_ATTRS = {"display_pub", "display_formatter", "publish"}  # IPython's output path
# Imports that reach outside the kernel or into the interpreter.
FORBIDDEN_IMPORTS = {"builtins", "ctypes", "subprocess", "multiprocessing", "pty", "importlib",
                     "signal", "IPython.core", "ipykernel"}
FORBIDDEN_CALLS = {"os.system", "os.popen", "os.fork", "os.forkpty", "os.kill", "os.killpg",
                   "os.setsid", "os.setpgrp", "sys.settrace", "sys.setprofile", "sys._getframe",
                   "inspect.currentframe", "gc.get_objects", "gc.get_referrers",
                   "gc.get_referents", "setattr", "delattr", "get_ipython", "__import__",
                   "globals"}
FORBIDDEN_CALL_PREFIXES = ("os.exec", "os.spawn", "os.posix_spawn")
# Strings that smuggle the same into eval'd code or a shell.
FORBIDDEN_TEXT = re.compile("|".join([r"subprocess", r"Popen", r"os\.system", r"/proc/", r"ctypes",
                                      re.escape(GRADER_KEY), re.escape(GRADER_PREFIX.rstrip(":")),
                                      r"display_pub"]))


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    if isinstance(node, ast.Call):  # get_ipython().display_pub ...
        inner = _dotted(node.func)
        return None if inner is None else ".".join([inner + "()", *reversed(parts)])
    return None


def _target_problem(target: ast.AST) -> str | None:
    if isinstance(target, ast.Name) and target.id in GRADER_NAMES:
        return f"rebinds {target.id!r}"
    if isinstance(target, ast.Attribute | ast.Subscript):
        base = target.value if isinstance(target, ast.Subscript) else target
        dotted = _dotted(base) or ""
        if dotted.split(".")[0] in PROTECTED_MODULES or dotted.startswith("get_ipython()"):
            return f"assigns to {dotted!r}"
        if isinstance(target, ast.Attribute) and target.attr in PROTECTED_ATTRS:
            return f"assigns to an attribute named {target.attr!r}"
    if isinstance(target, ast.Tuple | ast.List):
        return next((p for t in target.elts if (p := _target_problem(t))), None)
    return None


def strip_magics(source: str) -> str:
    """``source`` with IPython's own lines (``%magic``, ``!shell``, ``?help``) blanked, so the
    rest parses as Python (``scan`` reports ``!`` lines separately)."""
    return "\n".join("" if line.lstrip().startswith(("%", "?", "!")) else line
                     for line in source.splitlines())


def _bound(node: ast.AST) -> list[ast.AST]:
    """The targets a statement or clause binds or deletes (none for other nodes)."""
    if isinstance(node, ast.Assign | ast.Delete):
        return node.targets
    if isinstance(node, ast.AugAssign | ast.AnnAssign | ast.For | ast.AsyncFor |
                  ast.comprehension | ast.NamedExpr):
        return [node.target]
    if isinstance(node, ast.withitem) and node.optional_vars is not None:
        return [node.optional_vars]
    return []


def _node_problems(node: ast.AST) -> list[str]:
    problems = [p for t in _bound(node) if (p := _target_problem(t))]
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) \
            and node.name in GRADER_NAMES:
        problems.append(f"defines {node.name!r}")
    elif isinstance(node, ast.Global | ast.Nonlocal):
        problems += [f"declares {n!r} global" for n in node.names if n in GRADER_NAMES]
    elif isinstance(node, ast.Import | ast.ImportFrom):
        module = f"{node.module}." if isinstance(node, ast.ImportFrom) and node.module else ""
        for alias in node.names:
            full = module + alias.name
            if any(full == f or full.startswith(f + ".") for f in FORBIDDEN_IMPORTS):
                problems.append(f"imports {full!r}")
            if (alias.asname or alias.name) in GRADER_NAMES:
                problems.append(f"rebinds {alias.asname or alias.name!r} by import")
    elif isinstance(node, ast.Call):
        name = _dotted(node.func) or ""
        if name in FORBIDDEN_CALLS or name.startswith(FORBIDDEN_CALL_PREFIXES):
            problems.append(f"calls {name}()")
    elif isinstance(node, ast.Attribute) and (node.attr == "display_pub"
                                              or _dotted(node) == "sys.modules"):
        problems.append(f"uses {node.attr!r}")
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
            and (m := FORBIDDEN_TEXT.search(node.value)):
        problems.append(f"has a string mentioning {m.group(0)!r}")
    return problems


def scan(source: str) -> list[str]:
    """What in ``source`` (one code cell) reaches for the grader, as ``line N: ...`` strings in
    line order; an empty list when nothing does. Code that does not parse is left to fail when
    it runs."""
    found = {(i, "runs a shell command") for i, line in enumerate(source.splitlines(), 1)
             if line.lstrip().startswith("!")}
    try:
        tree = ast.parse(strip_magics(source))
    except SyntaxError:
        tree = ast.Module(body=[], type_ignores=[])
    found |= {(getattr(node, "lineno", 0), p) for node in ast.walk(tree)
              for p in _node_problems(node)}
    return [f"line {line}: {p}" for line, p in sorted(found)]
