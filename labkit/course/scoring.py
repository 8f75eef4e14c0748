"""Scoring a graded submission: points per check from its records and its trusted answers.

``student_records`` reads what the lab's record cells recorded in an executed notebook (other
cells' records are ignored and counted); ``score`` gives each rubric check its points or none:
a record check by its ``op`` (and, with ``recompute``, only if the trusted interpreter's value
agrees with the record), a hidden test by the trusted interpreter's answer
(``labkit.course.trusted``). Nothing here runs student code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from labkit.course.rubric import Check, Rubric
from labkit.records import cell_records


def normalized(source: str) -> str:
    """A cell's code as the kernel runs it (magics included), up to comments, quotes and layout
    (its AST), so a harmless edit to a lab's record cell keeps it trusted and an added magic line
    does not; text that does not parse is compared line by line."""
    import ast

    from labkit.course.tamper import parse_cell, python_source

    try:
        return ast.dump(parse_cell(python_source(source)))
    except SyntaxError:
        return "\n".join(line.rstrip() for line in source.strip().splitlines())


def _same(a, b, check: Check) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        tol = (check.rel_tol, check.abs_tol) if check.op == "close" else (1e-9, 0.0)
        return math.isclose(a, b, rel_tol=tol[0], abs_tol=tol[1])
    return a == b


def passes(value, check: Check) -> tuple[bool, str]:
    """Whether a recorded value meets the check, and what it got if not."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if check.op == "quiz":
        return check.quiz.is_right(value), check.quiz.feedback(value)
    if check.op == "true":
        return value is True, f"got {value!r}, expected true"
    if check.op == "equals":
        return value == check.expected, f"got {value!r}, expected {check.expected!r}"
    if not number:
        return False, f"got {value!r}, expected a number"
    if check.op == "close":
        ok = math.isclose(value, check.expected, rel_tol=check.rel_tol, abs_tol=check.abs_tol)
        return ok, f"got {value!r}, expected {check.expected!r} (rel_tol {check.rel_tol:g})"
    lo = -math.inf if check.min is None else check.min
    hi = math.inf if check.max is None else check.max
    return lo <= value <= hi, f"got {value!r}, expected between {check.min} and {check.max}"


def student_records(nb, trusted: set[str]) -> tuple[dict, int]:
    """The records of an executed notebook's record cells (``{name: value}``) and how many
    records were ignored (emitted by any other cell)."""
    records, ignored = {}, 0
    for cell in nb.cells:
        trusted_cell = normalized(cell.source) in trusted if cell.cell_type == "code" else False
        for payload in cell_records(cell):
            if trusted_cell:
                records[payload.get("name", "")] = payload.get("value")
            else:
                ignored += 1
    return records, ignored


def recorded(check: Check, records: dict):
    """The recorded value a check looks at (its ``key`` of a dict record)."""
    value = records[check.record]
    if check.key is not None:
        value = value.get(check.key) if isinstance(value, dict) else None
    return value


@dataclass
class CheckResult:
    """One check's outcome: points earned of ``max_points``, why it failed for the instructor
    (``why``: may quote the rubric's recomputation) and for the student (``student_why``: never
    the rubric's code), and what a failed trusted check last called (``tried``: the graded
    function and the arguments the check gave it, from ``labkit.course.harness``)."""

    name: str
    points: float
    max_points: float
    feedback: str
    why: str = ""
    student_why: str = ""
    tried: str = ""

    @property
    def passed(self) -> bool:
        return self.points > 0


def check_results(rubric: Rubric, records: dict, answers: dict) -> list[CheckResult]:
    """Each check's ``CheckResult`` from the student's ``records`` and the trusted interpreter's
    ``answers`` (``{"hidden:<name>" | "recompute:<name>": answer}``)."""
    out = []
    for check in rubric.checks:
        ok, why, mine, res = False, "", None, {}
        if check.kind == "hidden":
            res = answers.get(f"hidden:{check.name}")
            ok = isinstance(res, dict) and res.get("passed") is True
            why = "hidden test did not run (the notebook stopped before it)" if res is None \
                else res.get("error", "")
            res = res or {}
        elif check.record not in records:
            why = f"no record {check.record!r} from the lab's record cell"
        else:
            ok, why = passes(recorded(check, records), check)
            if ok and check.recompute:
                res = answers.get(f"recompute:{check.name}") or {}
                if "value" not in res:
                    ok, why = False, f"could not recompute {check.recompute!r}: " \
                                     f"{res.get('error', 'not run')}"
                    mine = "the grader could not recompute it from your code: " \
                           f"{res.get('error', 'not run')}"
                elif not _same(res["value"], records[check.record], check):
                    ok, why = False, (f"recorded {records[check.record]!r} but {check.recompute}"
                                      f" gives {res['value']!r}")
                    mine = (f"recorded {records[check.record]!r}, but the grader's recomputation "
                            f"from your code gives {res['value']!r}")
        out.append(CheckResult(check.name, float(check.points) if ok else 0.0,
                               float(check.points), check.feedback, "" if ok else why,
                               "" if ok else (why if mine is None else mine),
                               "" if ok else str(res.get("tried", ""))))
    return out


def lost_points(results: list[CheckResult]) -> list[str]:
    """The grade file's feedback lines: ``name: feedback (why)`` of each failed check."""
    return [f"{r.name}: {r.feedback} ({r.why})".replace(" ()", "") for r in results
            if not r.passed]


def score(rubric: Rubric, records: dict, answers: dict) -> tuple[dict, list[str]]:
    """Points per check and the grade file's feedback lines (``check_results``)."""
    results = check_results(rubric, records, answers)
    return {r.name: r.points for r in results}, lost_points(results)
