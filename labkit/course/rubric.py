"""Rubrics: what each lab's checks are, read from ``data/rubrics/labNN.toml`` and validated.

A rubric names a lab's solution notebook, a time limit per submission and a list of checks. A
``Check`` gives points for a recorded value (``kind = "record"``: the value a record cell
published with ``labkit.record``, compared with ``op``, optionally recomputed from the student's
own functions) or for a hidden test (``kind = "hidden"``: code from the rubric or from a
``### BEGIN HIDDEN TESTS name`` block of the solution notebook). Knowledge checks
(``[[quiz]]`` tables, ``labkit.quiz``) become record checks with ``op = "quiz"``: the answer
variable's record against the key, the feedback the key's explanation. ``load_rubric`` rejects a
rubric with an unknown field, kind or op, a missing field, a reserved or duplicate name, or code
that does not compile, and names the file, the check and the field. A rubric may also give
``setup`` (code the trusted interpreter runs before the checks, to rebuild the notebook state
its checks refer to), ``check_timeout_s`` (the time limit of each of those checks) and
``[limits]`` (the sandbox's ``labkit.course.sandbox.Limits``).
``labkit.course.grading`` runs and scores submissions against it; the format is in
data/rubrics/README.md.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from labkit.config import NOTEBOOKS_DIR, RUBRIC_DIR
from labkit.course.sandbox import Limits, limits_from
from labkit.quiz import Key, keys_from

NOTEBOOK_TIMEOUT_S = 600.0  # default time limit of one submission's run (seconds)
KINDS = ("record", "hidden")
OPS = ("equals", "close", "between", "true")  # "quiz" is set by [[quiz]] tables, not written
RESERVED = {"submission", "student", "status", "total", "max", "late", "override", "reason",
            "feedback"}  # columns of the grade file
_CHECK_FIELDS = {"name", "points", "kind", "feedback", "record", "key", "op", "expected",
                 "rel_tol", "abs_tol", "min", "max", "recompute", "code", "after"}


@dataclass(frozen=True)
class Check:
    """One rubric line: ``points`` for a recorded value (``record``) or a hidden test."""

    name: str
    points: float
    kind: str
    feedback: str = ""
    record: str | None = None
    key: str | None = None
    op: str = "equals"
    expected: object = None
    rel_tol: float = 1e-6
    abs_tol: float = 0.0
    min: float | None = None
    max: float | None = None
    recompute: str | None = None
    code: str | None = None
    after: str | None = None
    quiz: Key | None = None  # the answer key of a knowledge check (op "quiz")


@dataclass
class Rubric:
    """Checks of one lab and the solution notebook they refer to."""

    lab: str
    notebook: Path
    checks: list[Check]
    timeout_s: float = NOTEBOOK_TIMEOUT_S
    parameters: dict = field(default_factory=dict)
    closing: dict = field(default_factory=dict)  # the closing question and its model answer
    setup: str = ""  # code the trusted interpreter runs first (names its checks refer to)
    limits: Limits = field(default_factory=Limits)  # the sandbox's memory, CPU and processes
    check_timeout_s: float | None = None  # limit of one hidden test or recomputation (s)

    @property
    def max_points(self) -> float:
        return sum(c.points for c in self.checks)


def rubric_path(lab: int | str) -> Path:
    """``data/rubrics/labNN.toml`` for lab ``NN`` (an int, ``"1"``, ``"01"`` or ``"lab01"``)."""
    text = str(lab).removeprefix("lab")
    return RUBRIC_DIR / (f"lab{int(text):02d}.toml" if text.isdigit() else f"lab{text}.toml")


def _check(raw: dict, where: str, hidden_code: dict) -> Check:
    def bad(msg: str):
        return ValueError(f"{where}: {msg}")

    unknown = set(raw) - _CHECK_FIELDS
    if unknown:
        raise bad(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(_CHECK_FIELDS)}")
    for req in ("name", "points", "kind"):
        if req not in raw:
            raise bad(f"missing field {req!r}")
    if raw["kind"] not in KINDS:
        raise bad(f"unknown kind {raw['kind']!r}; choose one of: {', '.join(KINDS)}")
    if not isinstance(raw["points"], int | float) or raw["points"] <= 0:
        raise bad(f"points must be a positive number, got {raw['points']!r}")
    if raw["name"] in RESERVED:
        raise bad(f"name {raw['name']!r} is a column of the grade file already; choose another "
                  f"(reserved: {', '.join(sorted(RESERVED))})")
    check = Check(**raw)
    if check.kind == "record":
        if not check.record:
            raise bad("a record check needs 'record' (the name given to labkit.record)")
        if check.op not in OPS:
            raise bad(f"unknown op {check.op!r}; choose one of: {', '.join(OPS)}")
        if check.op in ("equals", "close") and check.expected is None:
            raise bad(f"op {check.op!r} needs 'expected'")
        if check.op == "between" and check.min is None and check.max is None:
            raise bad("op 'between' needs 'min' and/or 'max'")
        if check.recompute:
            compile(check.recompute, f"<{where} recompute>", "eval")  # SyntaxError names it
    else:
        code = check.code or hidden_code.get(check.name)
        if not code:
            raise bad(f"hidden check needs 'code', or a '### BEGIN HIDDEN TESTS {check.name}' "
                      f"block in the solution notebook")
        compile(code, f"<{where} code>", "exec")
        check = Check(**{**raw, "code": code})
    return check


def load_rubric(lab_or_path: int | str | Path) -> Rubric:
    """Read and validate a rubric (TOML or JSON); errors name the file, the check and the field."""
    import nbformat

    from labkit.course.assign import hidden_blocks

    path = Path(lab_or_path) if str(lab_or_path).endswith((".toml", ".json")) \
        else rubric_path(lab_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"rubric {str(path)!r} not found (see {RUBRIC_DIR}/README.md)")
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from None
    for req in ("lab", "notebook", "check"):
        if req not in data:
            raise ValueError(f"{path}: missing top-level field {req!r}")
    nb_path = Path(data["notebook"])
    if not nb_path.is_absolute():
        local = path.parent / nb_path
        nb_path = local if local.is_file() else NOTEBOOKS_DIR / nb_path
    if not nb_path.is_file():
        raise FileNotFoundError(f"{path}: solution notebook {str(nb_path)!r} not found")
    nb = nbformat.read(nb_path, as_version=4)
    hidden = {name: code for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for name, code in hidden_blocks(c.source, f"{nb_path.name} cell {i}") if name}
    checks, seen = [], set()
    for i, raw in enumerate(data["check"]):
        where = f"{path.name} check {i} ({raw.get('name', '?')})"
        try:
            check = _check(raw, where, hidden)
        except SyntaxError as exc:
            raise ValueError(f"{where}: Python syntax error in {exc.filename}: {exc.msg}") from None
        if check.name in seen:
            raise ValueError(f"{where}: duplicate check name {check.name!r}")
        seen.add(check.name)
        checks.append(check)
    for key in keys_from(data.get("quiz", []), path.name).values():
        if key.name in seen:
            raise ValueError(f"{path.name} quiz {key.name!r}: a check has that name already")
        seen.add(key.name)
        checks.append(Check(key.name, key.points, "record", "knowledge check", record=key.name,
                            op="quiz", expected=key.answer, quiz=key))
    closing = dict(data.get("closing", {}))
    if closing and set(closing) != {"question", "model_answer"}:
        raise ValueError(f"{path.name}: [closing] needs exactly 'question' and 'model_answer', "
                         f"got {sorted(closing)}")
    setup = data.get("setup", "")
    try:
        compile(setup, f"<{path.name} setup>", "exec")
    except SyntaxError as exc:
        raise ValueError(f"{path.name} setup: Python syntax error on line {exc.lineno}: "
                         f"{exc.msg}") from None
    return Rubric(str(data["lab"]), nb_path, checks,
                  float(data.get("timeout_s", NOTEBOOK_TIMEOUT_S)),
                  dict(data.get("parameters", {})), closing, setup,
                  limits_from(data.get("limits", {}), f"{path.name} [limits]"),
                  float(data["check_timeout_s"]) if "check_timeout_s" in data else None)
