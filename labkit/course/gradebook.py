"""The course gradebook: one CSV across labs, what ``labkit grade --gradebook`` regrades, the
instructor's overrides, and the export a learning platform imports.

The gradebook (``BOOK_COLUMNS``) has one row per student and lab: the submission's key and
``sha256``, the rubric's fingerprint (``fingerprint``: checks, setup, parameters, limits), status,
``auto_total`` (the grader's points) and ``total`` (after an override), ``max``, ``late`` and
``submitted_at``, ``override`` (its reason), the points per check as JSON, reason, feedback and
``graded_at``. ``labkit grade --gradebook BOOK`` regrades only submissions whose hash or rubric
fingerprint changed since BOOK recorded them (``reuse``; ``--regrade`` regrades all) and then
writes this lab's rows back (``update``), keeping every other lab's.

Overrides (``read_overrides``) are a CSV with the columns ``student, lab, points, reason``: an
instructor's points for one student's lab, applied last (after grading and reuse), shown in the
student's feedback and kept in the gradebook's ``override`` column.

``export_canvas`` writes Canvas's gradebook import CSV: the columns ``Student``, ``ID``,
``SIS User ID``, ``SIS Login ID``, ``Section``, then one column per assignment, one row per
student. Canvas needs one of Student (name), ID or SIS User ID to match a student, and creates a
new assignment for a column it does not know (Ohio State's guide to Canvas grade import,
https://teaching.resources.osu.edu/toolsets/carmencanvas/guides/calculating-final-grades/import-csv-file-carmen-grades,
and the export's layout described at
https://nemogb-dev.github.io/nemogb-r/articles/detailed-canvas-export-info.html). labkit puts the
student id (the submission's file or folder name) in ``SIS User ID`` and ``Student``, so name
submissions by SIS user id; the assignment columns are ``lab00``, ``lab01``, ...
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from labkit.course.rubric import Rubric
from labkit.course.submissions import lab_label

BOOK_COLUMNS = ["student", "lab", "submission", "sha256", "rubric", "status", "auto_total",
                "total", "max", "late", "submitted_at", "override", "points", "reason",
                "feedback", "graded_at", "detail"]
OVERRIDE_COLUMNS = ["student", "lab", "points", "reason"]
CANVAS_COLUMNS = ["Student", "ID", "SIS User ID", "SIS Login ID", "Section"]


def fingerprint(rubric: Rubric, parameters: Mapping) -> str:
    """A short hash of what decides a submission's points: the rubric's checks, setup, time
    limits and sandbox limits, and the notebook parameters of the run."""
    text = repr((rubric.checks, rubric.setup, rubric.timeout_s, rubric.check_timeout_s,
                 rubric.limits, sorted(parameters.items())))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_book(path: str | Path | None) -> list[dict]:
    """The gradebook's rows (an empty list when there is none yet)."""
    if path is None or not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and set(BOOK_COLUMNS) - set(rows[0]):
        raise ValueError(f"{path}: not a labkit gradebook (missing columns "
                         f"{sorted(set(BOOK_COLUMNS) - set(rows[0]))})")
    return rows


def reuse(book: list[dict], lab: str, student: str, sha256: str, rubric_hash: str) -> dict | None:
    """A grade-file row rebuilt from the gradebook if it graded this student's lab from the same
    notebook bytes and rubric; else None (the submission is new or changed)."""
    for old in book:
        if (old["student"], old["lab"], old["sha256"], old["rubric"]) == \
                (student, lab, sha256, rubric_hash) and sha256:
            return {"submission": old["submission"], "student": student, "status": old["status"],
                    "total": float(old["auto_total"]), "max": float(old["max"]),
                    **json.loads(old["points"] or "{}"), "reason": old["reason"],
                    "feedback": old["feedback"], "graded_at": old["graded_at"],
                    "detail": old["detail"]}
    return None


def update(path: str | Path, lab: str, rows: Iterable[dict]) -> list[dict]:
    """Write this lab's ``rows`` (grade rows with ``sha256``, ``rubric``, ``points``...) into the
    gradebook at ``path``, replacing the same students' rows of this lab; returns all rows."""
    rows = list(rows)
    mine = {r["student"] for r in rows}
    kept = [r for r in read_book(path) if not (r["lab"] == lab and r["student"] in mine)]
    new = [{**{c: r.get(c, "") for c in BOOK_COLUMNS}, "lab": lab} for r in rows]
    book = sorted(kept + new, key=lambda r: (r["student"], r["lab"]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, BOOK_COLUMNS)
        writer.writeheader()
        writer.writerows(book)
    return book


def read_overrides(path: str | Path | None) -> dict[tuple[str, str], tuple[float, str]]:
    """``{(student, lab label): (points, reason)}`` from an overrides CSV (module doc);
    ValueError naming the file, the row and the bad value."""
    if path is None:
        return {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(OVERRIDE_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; an overrides file has "
                             f"the columns {', '.join(OVERRIDE_COLUMNS)}")
        out = {}
        for n, raw in enumerate(reader, start=2):
            try:
                points = float(raw["points"])
            except (TypeError, ValueError):
                points = -1.0
            if points < 0 or points != points:
                raise ValueError(f"{path} row {n}: points {raw['points']!r} is not a number >= 0")
            if not (raw["student"] or "").strip() or not (raw["reason"] or "").strip():
                raise ValueError(f"{path} row {n}: student and reason must not be empty")
            out[(raw["student"].strip(), lab_label(raw["lab"]))] = (points, raw["reason"].strip())
    return out


def apply_override(row: dict, overrides: Mapping, lab: str) -> dict:
    """``row`` with ``auto_total`` (the grader's points) and, where the instructor overrode this
    student's lab, ``total`` set to their points and ``override`` to their reason."""
    row["auto_total"], row["override"] = row["total"], ""
    if (found := overrides.get((row["student"], lab))) is not None:
        row["total"], row["override"] = found
    return row


def apply_overrides(book: list[dict], overrides: Mapping) -> list[dict]:
    """Gradebook rows with ``overrides`` applied on top of what the rows hold (the overrides
    ``labkit grade`` applied stay)."""
    return [{**row, "total": found[0], "override": found[1]}
            if (found := overrides.get((row["student"], row["lab"]))) else row for row in book]


def wide(book: list[dict]) -> tuple[list[str], list[dict]]:
    """``(labs, rows)``: one row per student with the total of each lab (blank: not graded)."""
    labs = sorted({r["lab"] for r in book})
    students: dict[str, dict] = {}
    for r in book:
        students.setdefault(r["student"], {"student": r["student"]})[r["lab"]] = r["total"]
    return labs, [students[s] for s in sorted(students)]


def export_canvas(book: list[dict], out: str | Path) -> Path:
    """Write Canvas's gradebook import CSV (module doc) of the gradebook's totals to ``out``."""
    labs, rows = wide(book)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CANVAS_COLUMNS + labs)
        for r in rows:
            writer.writerow([r["student"], "", r["student"], "", ""] + [r.get(lab, "")
                                                                         for lab in labs])
    return out
