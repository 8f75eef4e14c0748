"""Find code in a submission that reaches for the grader instead of solving the exercise.

This is the grader's first line, not its defence: every submission runs in a sandbox and its
checks run in a separate trusted interpreter (``labkit.course.sandbox``, ``labkit.course.trusted``),
so nothing found here could harm the batch. The scan gives early, readable feedback and sets
aside for an instructor the notebooks that tried: ``scan(source)`` reads a cell's code (without
running it), as the kernel would run it (IPython's own transformation, so ``%magic``, ``%%bash``
and ``!shell`` lines are seen as what they are), and names every reach: rebinding the grader's
names; assigning into protected modules, also through an alias (``import sys as s``,
``m = sys.modules``); starting processes or shells (magics other than ``ALLOWED_MAGICS``);
reading builtins or modules by name (``getattr(__builtins__, ...)``, ``vars(json)``); frame and
object introspection; code built at run time (``exec``, ``eval``). Cells the student did not change
are not scanned.

Findings come in two kinds (``sandboxed``): what the sandbox makes harmless (a shell line or
shell magic, ``subprocess``/``multiprocessing``/``importlib`` imports, ``os.system``/``fork``/
``kill``/environment calls, strings naming them: they can only reach the submission's own box)
is a warning in its feedback and the notebook is graded; the rest (rebinding the grader's names,
assigning into protected modules, introspection, code built at run time, other magics) is
tampering: the submission is flagged, not run, and scores zero with the findings as its reason,
until an instructor looks at it (``labkit grade --allow-flagged NAME``).
"""

from __future__ import annotations

import ast
import functools
import re

# Names the grader's checks resolve: rebinding them is never needed.
GRADER_NAMES = {"exec", "eval", "compile", "__import__", "__builtins__", "builtins",
                "get_ipython", "globals"}
# Modules whose attributes the grader or the kernel rely on: assigning into them is tampering.
PROTECTED_MODULES = {"builtins", "__builtins__", "json", "labkit", "IPython", "sys", "os",
                     "papermill", "nbformat", "ipykernel", "inspect", "linecache", "signal"}
PROTECTED_ATTRS = {"display_pub", "display_formatter", "publish"}  # IPython's output path
# Imports that reach outside the kernel or into the interpreter.
FORBIDDEN_IMPORTS = {"builtins", "ctypes", "subprocess", "multiprocessing", "pty", "importlib",
                     "signal", "IPython.core", "ipykernel", "marshal"}
FORBIDDEN_CALLS = {"os.system", "os.popen", "os.fork", "os.forkpty", "os.kill", "os.killpg",
                   "os.setsid", "os.setpgrp", "os.putenv", "os.unsetenv", "os.environ.pop",
                   "sys.settrace", "sys.setprofile", "sys._getframe", "sys.addaudithook",
                   "inspect.currentframe", "inspect.stack", "gc.get_objects", "gc.get_referrers",
                   "gc.get_referents", "setattr", "delattr", "globals",
                   "get_ipython", "__import__", "exec", "eval", "compile", "breakpoint"}
FORBIDDEN_CALL_PREFIXES = ("os.exec", "os.spawn", "os.posix_spawn")
# Attributes that reach frames, code objects, globals and the class graph of the interpreter.
INTROSPECTION = {"__globals__", "__builtins__", "__subclasses__", "__bases__", "__base__",
                 "__mro__", "__code__", "__closure__", "__traceback__", "__reduce__",
                 "__reduce_ex__", "__loader__", "__spec__", "f_globals", "f_locals", "f_back",
                 "f_builtins", "tb_frame", "tb_next", "gi_frame", "cr_frame", "ag_frame",
                 "co_code", "display_pub"}
# Magics that run Python code given to them (scanned too) or only show things.
ALLOWED_MAGICS = {"time": True, "timeit": True, "capture": True, "prun": True,
                  "matplotlib": False, "pinfo": False, "pinfo2": False}
SHELL_CALLS = {"system", "getoutput"}  # what IPython makes of ``!cmd`` and ``x = !cmd``
# Strings that smuggle the same into code run elsewhere or a shell.
FORBIDDEN_TEXT = re.compile("|".join([r"subprocess", r"Popen", r"os\.system", r"/proc/", r"ctypes",
                                      r"display_pub", r"setsid", r"nohup"]))

# Findings that the sandbox makes harmless: a process, a shell or an environment variable can
# only reach the submission's own box (``sandboxed``).
SANDBOXED = re.compile(
    r"runs a shell command|uses the %%?(?:bash|sh|system|sx|script) magic"
    r"|imports '(?:subprocess|multiprocessing|pty|importlib)(?:\.[\w.]*)?'"
    r"|calls (?:os\.(?:system|popen|fork|forkpty|kill|killpg|setsid|setpgrp|putenv|unsetenv"
    r"|environ\.pop|exec\w*|spawn\w*|posix_spawn\w*)|asyncio\.create_subprocess_\w+)\(\)"
    r"|uses '\w*subprocess\w*'"
    r"|has a string mentioning '(?:subprocess|Popen|os\.system|/proc/|setsid|nohup)'")


def sandboxed(finding: str) -> bool:
    """Whether a ``scan`` finding is one the sandbox makes harmless (a warning, not tampering)."""
    return SANDBOXED.search(finding) is not None


@functools.cache
def _transformer():
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager()


def python_source(source: str) -> str:
    """A cell's code as the kernel runs it: IPython's transformation turns ``%magic``, ``%%cell``
    magics, ``!shell`` and ``name?`` lines into ``get_ipython()`` calls."""
    return _transformer().transform_cell(source)


def parse_cell(code: str) -> ast.Module:
    """The syntax tree of a cell's Python code (top-level ``await`` allowed, as in IPython);
    SyntaxError if it does not parse."""
    return compile(code, "<cell>", "exec", ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute | ast.Subscript):  # x[k] is written x[]
        parts.append(node.attr if isinstance(node, ast.Attribute) else "[]")
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts)).replace(".[]", "[]")
    if isinstance(node, ast.Call):  # get_ipython().display_pub ...
        inner = _dotted(node.func)
        return None if inner is None else \
            ".".join([inner + "()", *reversed(parts)]).replace(".[]", "[]")
    return None


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local names of modules and their attributes: ``import sys as s`` -> ``{"s": "sys"}``,
    ``from os import system as run`` -> ``{"run": "os.system"}``, ``m = sys.modules`` -> ..."""
    names: dict[str, str] = {}
    for _ in range(3):  # a few rounds resolve chains of plain assignments
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname:
                        names[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    names[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 \
                    and isinstance(node.targets[0], ast.Name) \
                    and (full := _resolve(_dotted(node.value), names)) \
                    and full.split(".")[0] in PROTECTED_MODULES:
                names[node.targets[0].id] = full
    return names


def _resolve(dotted: str | None, names: dict[str, str]) -> str | None:
    if not dotted:
        return dotted
    head, rest = re.match(r"([^.\[]*)(.*)", dotted).groups()
    return names.get(head, head) + rest


def _target_problem(target: ast.AST, names: dict[str, str]) -> str | None:
    if isinstance(target, ast.Name) and target.id in GRADER_NAMES:
        return f"rebinds {target.id!r}"
    if isinstance(target, ast.Attribute | ast.Subscript):
        base = target.value if isinstance(target, ast.Subscript) else target
        dotted = _resolve(_dotted(base), names) or ""
        if dotted.split(".")[0] in PROTECTED_MODULES or "get_ipython()" in dotted:
            return f"assigns to {dotted!r}"
        if isinstance(target, ast.Attribute) and target.attr in PROTECTED_ATTRS:
            return f"assigns to an attribute named {target.attr!r}"
    if isinstance(target, ast.Tuple | ast.List):
        return next((p for t in target.elts if (p := _target_problem(t, names))), None)
    return None


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


def _magic(node: ast.Call) -> tuple[str, list[str]] | None:
    """``(kind, literal args)`` of a ``get_ipython().run_line_magic/run_cell_magic/system/
    getoutput(...)`` call (what IPython writes for magics and shell lines), else None."""
    func = node.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Call) \
            and _dotted(func.value.func) == "get_ipython" and not func.value.args \
            and func.attr in {"run_line_magic", "run_cell_magic", *SHELL_CALLS} \
            and all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in node.args):
        return func.attr, [a.value for a in node.args]
    return None


def _call_problems(node: ast.Call, names: dict[str, str], line: int) -> list[tuple[int, str]]:
    if (magic := _magic(node)) is not None:
        kind, args = magic
        if kind in SHELL_CALLS:
            return [(line, "runs a shell command")]
        name, *rest = args or ["?"]
        mark = "%" if kind == "run_line_magic" else "%%"
        if name not in ALLOWED_MAGICS:
            return [(line, f"uses the {mark}{name} magic (allowed: "
                           f"{', '.join('%' + m for m in sorted(ALLOWED_MAGICS))})")]
        offset = 0 if kind == "run_line_magic" else 1  # a cell magic's code starts below it
        return [(line + offset + i - 1, p) for code in rest if ALLOWED_MAGICS[name]
                for i, p in _scan_tree(code)] if rest else []
    name = _resolve(_dotted(node.func), names) or ""
    problems = []
    if name in FORBIDDEN_CALLS or name.startswith(FORBIDDEN_CALL_PREFIXES) \
            or name.endswith(".get_ipython") or name.startswith("asyncio.create_subprocess"):
        problems.append(f"calls {name}()")
    if name in ("getattr", "vars") and node.args:
        target = _resolve(_dotted(node.args[0]), names) or ""
        attr = node.args[1] if len(node.args) > 1 else None
        if target.split(".")[0] in PROTECTED_MODULES:
            problems.append(f"reads {target!r} by name ({name})")
        elif isinstance(attr, ast.Constant) and (attr.value in INTROSPECTION
                                                 or attr.value in GRADER_NAMES):
            problems.append(f"reads the attribute {attr.value!r} by name")
    return [(line, p) for p in problems]


def _node_problems(node: ast.AST, names: dict[str, str]) -> list[tuple[int, str]]:
    line = getattr(node, "lineno", 0)
    problems = [p for t in _bound(node) if (p := _target_problem(t, names))]
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
        return [(line, p) for p in problems] + _call_problems(node, names, line)
    elif isinstance(node, ast.Attribute) and (node.attr in INTROSPECTION
                                              or "subprocess" in node.attr
                                              or _resolve(_dotted(node), names) == "sys.modules"):
        problems.append(f"uses {node.attr!r}")
    elif isinstance(node, ast.Name) and node.id in ("__builtins__", "get_ipython"):
        problems.append(f"uses {node.id!r}")
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
            and (m := FORBIDDEN_TEXT.search(node.value)):
        problems.append(f"has a string mentioning {m.group(0)!r}")
    return [(line, p) for p in problems]


def _scan_tree(code: str) -> list[tuple[int, str]]:
    """(line, finding) pairs of Python ``code`` (a cell already transformed by IPython)."""
    try:
        tree = parse_cell(code)
    except SyntaxError:
        return []
    names = _aliases(tree)
    magic_args = {id(a) for n in ast.walk(tree) if isinstance(n, ast.Call) and _magic(n)
                  for a in [*n.args, n.func.value, n.func.value.func]}
    return [found for node in ast.walk(tree) if id(node) not in magic_args
            for found in _node_problems(node, names)]


def scan(source: str) -> list[str]:
    """What in ``source`` (one code cell) reaches for the grader, as ``line N: ...`` strings in
    line order; an empty list when nothing does. Code that does not parse is left to fail when
    it runs."""
    return [f"line {line}: {p}" for line, p in sorted(set(_scan_tree(python_source(source))))]
