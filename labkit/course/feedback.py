"""What a student gets back from ``labkit grade --feedback DIR``: one Markdown file per student and
lab, ``DIR/<student>/<lab>.md``, and the executed notebook next to it.

The file gives the score (and an instructor's override, applied last, with its reason), whether
the submission was late, a table of points per check, for each failed check its feedback, why it
failed and what it tried (the input the hidden test gave the student's function, e.g.
``tokens_per_second(namespace(token_times_s=[]))``, never the check's code), where the notebook
stopped with the first traceback in the student's own cell numbers, and the warnings of the scan
(code the sandbox made harmless). Nothing in it comes from the rubric's code: recomputations are
described, not quoted (``labkit.course.scoring.CheckResult.student_why``).

The executed notebook handed back (``student_copy``) drops papermill's injected parameters cell
(cell numbers are the student's own) and any hidden-test block a submission carried. ``leaks``
lists the rubric's code lines found in a text: the tests check every feedback file with it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from labkit.course.rubric import Rubric
from labkit.course.runner import ERROR_TAG, INJECTED_TAG, source_index
from labkit.course.scoring import CheckResult

_CELL_IN = re.compile(r"Cell In\[(\d+)\], line")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MIN_LINE = 12  # shorter code lines (``else:``, ``pass``) say nothing of a check


def rubric_code_lines(rubric: Rubric) -> list[str]:
    """The lines of the rubric's hidden tests, recomputations and setup (stripped, at least
    ``MIN_LINE`` characters) that the released notebook does not hold itself (``except
    ValueError:`` or an import is no secret): what no student-facing file may contain."""
    from labkit.course.released import released_lab

    given = {line.strip() for src in released_lab(rubric)[0] for line in src.splitlines()}
    codes = [c.code or "" for c in rubric.checks] + [c.recompute or "" for c in rubric.checks]
    return sorted({line.strip() for code in [*codes, rubric.setup] for line in code.splitlines()
                   if len(line.strip()) >= MIN_LINE and not line.strip().startswith("#")
                   and line.strip() not in given})


def leaks(text: str, rubric: Rubric) -> list[str]:
    """The rubric code lines (``rubric_code_lines``) that appear in ``text``."""
    return [line for line in rubric_code_lines(rubric) if line in text]


def renumber_traceback(text: str, nb) -> str:
    """A traceback of executed notebook ``nb`` without colour codes, IPython's ``Cell In[k]``
    (execution counts, shifted by papermill's injected cell) written as the student's
    ``cell N``."""
    where = {c.get("execution_count"): source_index(nb, i) for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and c.get("execution_count")}

    def cell(match: re.Match) -> str:
        n = where.get(int(match.group(1)))
        return match.group(0) if n is None else f"cell {n}, line"

    return _CELL_IN.sub(cell, _ANSI.sub("", text))


def student_copy(nb):
    """A copy of executed notebook ``nb`` for its student: papermill's cells dropped, and each
    hidden-test block removed (a cell it emptied keeps its place, without outputs)."""
    import copy

    from labkit.course.assign import BEGIN_HIDDEN, strip_hidden_tests

    out = copy.deepcopy(nb)
    out.cells = [c for c in out.cells if not {INJECTED_TAG, ERROR_TAG}
                 & set(c.get("metadata", {}).get("tags", []))]
    for cell in out.cells:
        if cell.cell_type == "code" and BEGIN_HIDDEN in cell.source:
            try:
                cell.source = strip_hidden_tests(cell.source)
            except ValueError:  # unbalanced markers: nothing of the cell is kept
                cell.source = ""
            cell.outputs = []
    out.metadata.get("papermill", {}).pop("parameters", None)
    return out


def _table(results: Iterable[CheckResult]) -> list[str]:
    rows = ["| check | points | of | |", "|---|---:|---:|---|"]
    rows += [f"| {r.name} | {r.points:g} | {r.max_points:g} | {'passed' if r.passed else 'failed'}"
             " |" for r in results]
    return rows


def render(row: dict, detail: dict, lab: str) -> str:
    """The Markdown feedback of one graded row (``labkit.course.grading.grade_one``)."""
    lines = [f"# {lab} feedback: {row['student']}", "",
             f"Submission `{row['submission']}`, submitted {row.get('submitted_at', '?')}"
             + (" (**late**: after the deadline)" if row.get("late") else "") + ".", "",
             f"**Score: {row['total']:g} of {row['max']:g}** (status: {row['status']})"]
    if row.get("override"):
        lines += ["", f"Instructor's override (applied last): {row['total']:g} points instead of "
                      f"{row['auto_total']:g}; reason: {row['override']}"]
    if row["status"] == "flagged":
        lines += ["", "Your notebook was not run: an instructor will look at these cells "
                      "first.", *[f"- {f}" for f in detail.get("flagged", [])]]
    results = detail.get("results", [])
    if results:
        lines += ["", "## Points per check", "", *_table(results)]
    failed = [r for r in results if not r.passed]
    if failed and row["status"] != "flagged":
        lines += ["", "## What the failed checks tried", ""]
        for r in failed:
            text = f"- **{r.name}** (0 of {r.max_points:g}): {r.feedback}"
            text += f". Why: {r.student_why}" if r.student_why else ""
            text += f". Input: `{r.tried}`" if r.tried else ""
            lines.append(text)
    if detail.get("reason"):
        lines += ["", "## Where your notebook stopped", "", detail["reason"]]
        if detail.get("traceback"):
            lines += ["", "```", detail["traceback"].strip(), "```"]
    notes = detail.get("warnings", []) + detail.get("notes", [])
    if notes:
        lines += ["", "## Warnings (not scored)", "",
                  *[f"- {n}" for n in detail.get("warnings", [])[:20]],
                  *[f"- {n}" for n in detail.get("notes", [])]]
    return "\n".join(lines) + "\n"


def write_feedback(directory: str | Path, row: dict, detail: dict, lab: str) -> Path:
    """Write ``DIR/<student>/<lab>.md`` (and the student's copy of the executed notebook, when
    ``detail`` has one); returns the Markdown file's path."""
    import nbformat

    folder = Path(directory) / row["student"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{lab}.md"
    path.write_text(render(row, detail, lab))
    if detail.get("executed") is not None:
        nbformat.write(student_copy(detail["executed"]), folder / Path(row["submission"]).name)
    return path


def deliver(row: dict, detail: dict, rubric: Rubric, lab: str, executed_dir: Path | None,
            feedback_dir: str | Path | None) -> dict:
    """Hand one graded row out: the student's copy of its executed notebook to
    ``executed_dir/<submission>``, its feedback file to ``feedback_dir`` (if given); returns the
    row with what the gradebook keeps (``points`` and ``detail`` as JSON, ``graded_at``)."""
    import json
    from dataclasses import asdict
    from datetime import datetime

    import nbformat

    detail = {**detail, "results": [r if isinstance(r, CheckResult) else CheckResult(**r)
                                    for r in detail.get("results", [])]}
    executed = detail.pop("executed", None)
    if executed is not None and executed_dir is not None:
        target = Path(executed_dir) / row["submission"]
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(student_copy(executed), target)
    if feedback_dir is not None:
        write_feedback(feedback_dir, row, {**detail, "executed": executed}, lab)
    kept = {**detail, "results": [asdict(r) for r in detail["results"]]}
    now = datetime.now().astimezone().isoformat(timespec="seconds")
    return {**row, "points": json.dumps({c.name: row.get(c.name, 0.0) for c in rubric.checks}),
            "detail": json.dumps(kept), "graded_at": row.get("graded_at") or now}
