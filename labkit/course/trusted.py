"""Trusted checks: a submission's hidden tests and recomputations, run outside its kernel.

``TrustedChecks`` starts one fresh interpreter per submission (``labkit.course.harness``,
sandboxed like the kernel, ``labkit.course.sandbox``) while its kernel runs, and sends it what
a check may use, CS336-adapter style: never the kernel's state, only

- the lab's parameters cell (from the released notebook) and the grader's parameter values;
- the rubric's ``setup`` code, which rebuilds the notebook state the checks refer to;
- the student's graded definitions, ``definitions(nb, graded_names(rubric))``: from each cell of
  the executed notebook that defines a graded name (a function or class of the solution's
  exercise cells), its top-level imports, ``def`` and ``class`` statements and call-free
  assignments, plus the imports of the other cells that ran that those need;
- the values the lab's record cells recorded (``records``), as data.

Each check is asked for with a fresh nonce and answered on a channel the student's code does not
print to; a check that does not answer within its time limit fails, and the interpreter is
started again for the checks after it. The grader, not the interpreter, compares recomputed
values with the records.
"""

from __future__ import annotations

import ast
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from labkit.course.runner import source_index
from labkit.course.sandbox import Limits, command, make_box, remove_box

GRACE_S = 5.0  # how much longer than a check's own limit the grader waits for its answer
MAX_ANSWER_BYTES = 1 << 20  # an answer line longer than this is no answer
HARNESS = [sys.executable, "-I", "-m", "labkit.course.harness"]


# --------------------------------------------------------------------------- what is sent
def _exercise_names(source: str) -> list[str]:
    """Top-level functions and classes of a cell with a solution block."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [n.name for n in tree.body
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]


def graded_names(solution_nb) -> tuple[str, ...]:
    """The names a lab grades: functions and classes defined at the top level of the solution
    notebook's cells that hold a ``### BEGIN SOLUTION`` block."""
    from labkit.course.assign import BEGIN_SOLUTION

    return tuple(dict.fromkeys(name for c in solution_nb.cells
                               if c.cell_type == "code" and BEGIN_SOLUTION in c.source
                               for name in _exercise_names(c.source)))


def ran(cell) -> bool:
    """Whether papermill started this code cell of an executed notebook."""
    return cell.cell_type == "code" and bool(cell.get("metadata", {}).get("papermill", {})
                                             .get("start_time"))


def _tree(source: str) -> ast.Module | None:
    from labkit.course.tamper import parse_cell, python_source

    try:
        return parse_cell(python_source(source))
    except SyntaxError:
        return None


def _kept(node: ast.stmt) -> bool:
    """What the trusted interpreter loads from an exercise cell: imports, defs, classes, and
    assignments to plain names whose value calls and awaits nothing."""
    if isinstance(node, ast.Import | ast.ImportFrom | ast.FunctionDef | ast.AsyncFunctionDef
                  | ast.ClassDef):
        return True
    targets = node.targets if isinstance(node, ast.Assign) else \
        [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else []
    return bool(targets) and all(isinstance(t, ast.Name) for t in targets) and \
        not any(isinstance(n, ast.Call | ast.Await) for n in ast.walk(node.value))


def _bound(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {node.name}
    return {t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])}


def definitions(nb, names: Sequence[str]) -> list[tuple[str, str]]:
    """``(label, source)`` pieces the trusted interpreter loads, in notebook order: the kept
    statements (``_kept``) of each cell that ran and defines one of ``names`` at the top level,
    and the top-level imports of other cells that ran that bind a name those use. Labels are
    ``cell N`` as the student sees it."""
    cells = [(source_index(nb, i), tree) for i, c in enumerate(nb.cells)
             if ran(c) and (tree := _tree(c.source)) is not None]
    graded = [(i, [n for n in tree.body if _kept(n)]) for i, tree in cells
              if any(_bound(n) & set(names) for n in tree.body if _kept(n))]
    wanted = {n.id for _, body in graded for stmt in body for n in ast.walk(stmt)
              if isinstance(n, ast.Name)}
    chosen = {i for i, _ in graded}
    pieces = []
    for i, tree in cells:
        body = dict(graded).get(i) if i in chosen else [
            n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)
            and not any(a.name == "*" for a in n.names) and _bound(n) & wanted]
        if body:
            pieces.append((f"cell {i}", "\n".join(ast.unparse(n) for n in body)))
    return pieces


def names(code: str, mode: str = "exec") -> tuple[set[str], set[str]]:
    """``(reads, binds)`` of a check's code (``exec``) or expression (``eval``), or of a setup:
    the names it reads and does not bind itself (what it needs from the trusted interpreter's
    namespace), and the names it binds."""
    reads, binds = set(), set()
    for node in ast.walk(ast.parse(code, mode=mode)):
        if isinstance(node, ast.Name):
            (reads if isinstance(node.ctx, ast.Load) else binds).add(node.id)
        elif isinstance(node, ast.alias):
            binds.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.arg):
            binds.add(node.arg)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            binds.add(node.name)
    return reads - binds, binds


def parameters_source(released_nb) -> str:
    """The source of the released notebook's ``parameters`` cell (empty if it has none)."""
    return next((c.source for c in released_nb.cells if c.cell_type == "code"
                 and "parameters" in c.get("metadata", {}).get("tags", [])), "")


# --------------------------------------------------------------------------- running the checks
class _Answers:
    """Lines from the interpreter's answer channel, each within a deadline."""

    def __init__(self, proc: subprocess.Popen):
        self.fd, self.buf = proc.stdout.fileno(), b""

    def line(self, timeout_s: float) -> tuple[str | None, str]:
        """The next line, or None and why not (``timeout``, ``exited``, ``too long``)."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_ANSWER_BYTES:
                return None, "too long"
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None, "timeout"
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None, "exited"
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("utf-8", "replace"), ""


class _Interpreter:
    """One harness process (sandboxed in a fresh box, else plainly in a fresh folder), started
    with the setup part of its job so that it loads while the kernel runs."""

    def __init__(self, work: Path, n: int, setup: dict, sandboxed: bool, limits: Limits,
                 hidden: Sequence[Path], env: Mapping[str, str]):
        self.log = open(work / f"harness-{n}.log", "w+b")  # noqa: SIM115 (closed by stop)
        self.box, self.started = None, time.monotonic()
        pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        if sandboxed:
            self.box = make_box(work, f"trusted-{n}")
            self.proc = subprocess.Popen(command(self.box, HARNESS, limits, env, hidden),
                                         **pipes)
        else:
            (work / f"trusted-{n}").mkdir()
            self.proc = subprocess.Popen(HARNESS, cwd=work / f"trusted-{n}", env={
                **os.environ, **env}, start_new_session=True, **pipes)
        self.answers = _Answers(self.proc)
        self.send(setup)

    def send(self, message: dict) -> bool:
        """Write one JSON line to the harness; False if it is gone."""
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
            return True
        except BrokenPipeError:
            return False

    def stop(self) -> tuple[int, str]:
        """Kill it and everything it started; (processes killed afterwards, its last stderr
        line)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL) if self.box is None else self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait()
        killed = remove_box(self.box) if self.box is not None else 0
        self.log.seek(max(0, self.log.seek(0, os.SEEK_END) - 600))
        tail = self.log.read().decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        self.log.close()
        return killed, tail[0]


class TrustedChecks:
    """The trusted interpreter of one submission: ``TrustedChecks(work, setup, ...)`` starts it
    (``setup``: ``{"parameters", "overrides", "setup"}``, see ``labkit.course.harness``), ``run``
    asks it for checks, ``close`` ends it (``env``: extra variables, e.g. the GPU it may see).
    A check that gets no answer fails, and a fresh one is started (setup again) for the checks
    after it."""

    def __init__(self, work: Path, setup: dict, *, sandboxed: bool, limits: Limits,
                 setup_timeout_s: float, hidden: Sequence[Path] = (),
                 env: Mapping[str, str] | None = None):
        self.args = (work, setup, sandboxed, limits, hidden, dict(env or {}))
        self.setup_timeout_s, self.starts, self.killed = setup_timeout_s, 1, 0
        self.current: _Interpreter | None = _Interpreter(work, 1, *self.args[1:])

    def run(self, job: dict, keys: Sequence[str], check_timeout_s: float) -> dict[str, dict]:
        """Answers to the checks ``keys`` of ``job`` (``{"definitions", "graded", "records",
        "checks"}``), each within ``check_timeout_s`` seconds: ``{key: answer}``."""
        job = {**job, "timeout_s": check_timeout_s}
        answers: dict[str, dict] = {}
        todo = list(keys)
        while todo:
            if self.current is None:
                self.starts += 1
                self.current = _Interpreter(self.args[0], self.starts, *self.args[1:])
            if self._converse(job, todo, answers, check_timeout_s):
                tail = self.close()
                for answer in answers.values():  # a crash: its last words say why
                    if answer.get("error", "").endswith("(exited)") and tail:
                        answer["error"] += f": {tail}"
        return answers

    def close(self) -> str:
        """Stop the interpreter (if one runs); its last stderr line. ``killed`` counts the
        processes it left."""
        if self.current is None:
            return ""
        left, tail = self.current.stop()
        self.killed, self.current = self.killed + left, None
        return tail

    def _converse(self, job: dict, todo: list[str], answers: dict, check_timeout_s: float) -> bool:
        """Send the job, then ask for the checks in ``todo`` one by one (taking them off it) and
        fill ``answers``; True if the interpreter is done for (it did not start, or a check got
        no answer: it is not to be trusted with the rest)."""
        it = self.current
        left_s = self.setup_timeout_s - (time.monotonic() - it.started)
        line, why = it.answers.line(max(1.0, left_s))  # the setup ran meanwhile
        ready, what = _parse(line, None) or {}, "the trusted interpreter did not start"
        if ready.get("set") and it.send(job):  # loading the student's code: a check's time
            line, why = it.answers.line(check_timeout_s + GRACE_S)
            ready, what = _parse(line, None) or {}, "loading your definitions did not finish"
        if not ready.get("ready"):
            error = ready.get("error") or f"{what} ({why or 'not its answer'})"
            answers.update({k: {"passed": False, "error": error} for k in todo})
            todo.clear()
            return True
        notes = "; ".join(ready.get("problems", []))
        while todo:
            key, nonce = todo.pop(0), secrets.token_hex(8)
            line, why = it.answers.line(check_timeout_s + GRACE_S) \
                if it.send({"check": key, "nonce": nonce}) else (None, "exited")
            answer = _parse(line, nonce)
            if answer is None:
                answers[key] = {"passed": False, "error": (
                    f"TimeoutError: took longer than {check_timeout_s:g} s" if why == "timeout"
                    else f"no answer from the trusted interpreter ({why or 'not its answer'})")}
                return True
            if notes and "error" in answer:
                answer["error"] = f"{answer['error']} (loading your code: {notes})"
            answers[key] = answer
        return False


def _parse(line: str | None, nonce: str | None) -> dict | None:
    """The JSON object on ``line`` if it carries ``nonce`` (None: the ready line, which has
    none); else None (no answer, or not the one asked for)."""
    try:
        answer = json.loads(line) if line else None
    except json.JSONDecodeError:
        return None
    if not isinstance(answer, dict) or answer.pop("nonce", None) != nonce:
        return None
    return answer
