"""``labkit grade``: run every submission of a lab in a sandbox and score it against its rubric.

A submission goes through four steps (the threat model is in data/rubrics/README.md):

1. The static scan (``labkit.course.tamper``) of the cells the student wrote or changed: one
   that reaches for the grader is flagged, not run (``allow_flagged`` runs it after an
   instructor looked); code the sandbox makes harmless (a shell line) is only a warning.
2. Its kernel runs the notebook under papermill in the ci profile, with a time limit for the
   whole run, inside a box of its own (``labkit.course.sandbox``: namespaces, a private
   folder, HOME and IPython dir, no network, memory/CPU/process limits from the rubric);
   every process it started is gone afterwards.
3. Only records emitted by the lab's own record cells (code unchanged from the released
   notebook) count; they are claims, not verdicts.
4. Its hidden tests and recomputations run outside the kernel, in a fresh sandboxed
   interpreter that gets the student's graded definitions and the recorded values
   (``labkit.course.trusted``); the grader compares the recomputed values with the records.

Points are summed per check (partial credit); a notebook that stops early keeps the points of
the records it produced and of the exercises it reached. Steps 2-4 live in
``labkit.course.batch``; this module scans, scores and writes.

At class scale (``grade(..., jobs=N)``, ``labkit grade -j N``) submissions run side by side,
each in its own sandbox as above; with ``gpus=["0", "1"]`` (``--gpus 0,1``) one submission runs
per GPU at a time, its kernel and trusted interpreter seeing only that card
(``CUDA_VISIBLE_DEVICES``). Submissions are found in flat or nested (nbgrader) folders
(``labkit.course.submissions``); per-student feedback goes to ``feedback_dir``
(``labkit.course.feedback``), rows to a gradebook across labs, which also says what need not be
graded again (``labkit.course.gradebook``).
"""

from __future__ import annotations

import json
import tempfile
from datetime import datetime
from pathlib import Path

from labkit.course.batch import CHECK_TIMEOUT_S, GRADE_MARK, Batch, Outcome, run_submission
from labkit.course.released import given_sources, record_cells, tampering, warnings
from labkit.course.rubric import Rubric, load_rubric
from labkit.course.sandbox import unavailable
from labkit.course.scoring import check_results, lost_points
from labkit.course.submissions import Submission, find_submissions, is_late, lab_label

__all__ = ["grade", "grade_one", "Batch", "record_cells", "given_sources", "tampering",
           "CHECK_TIMEOUT_S", "GRADE_MARK"]

UNSAFE = "graded without a sandbox (--no-sandbox): its code ran with the grader's rights"


def _flag_reason(flagged: list[str]) -> str:
    return ("not run: reaches for the grader, an instructor should look at it ("
            + "; ".join(flagged[:5]) + (" ..." if len(flagged) > 5 else "") + ")")


def grade_one(sub: Submission, batch: Batch, env: dict | None = None) -> tuple[dict, dict]:
    """Run and score one submission (``env``: extra variables of its kernel and trusted
    interpreter, e.g. its GPU); ``(grade-file row, detail for its feedback)``. Never raises for
    a broken submission."""
    import nbformat

    run, detail = Outcome(), {"warnings": [], "notes": [], "flagged": []}
    try:
        nb = nbformat.read(sub.path, as_version=4)
    except Exception as exc:  # noqa: BLE001 (a broken file is a graded row)
        nb, run.status, run.reason = None, "error", f"unreadable notebook: {exc}"
    flagged = tampering(nb, batch.given) if nb is not None else []
    detail["warnings"] = warnings(nb, batch.given) if nb is not None else []
    if flagged and {sub.student, sub.key} & batch.allow_flagged:
        detail["notes"].append("graded although the scan flagged it (--allow-flagged): "
                               + "; ".join(flagged))
        flagged = []
    if flagged:
        run.status, run.reason, detail["flagged"] = "flagged", _flag_reason(flagged), flagged
    elif nb is not None:
        with tempfile.TemporaryDirectory(prefix="labkit-grade-") as tmp:
            run = run_submission(nb, sub.path.name, Path(tmp), batch, dict(env or {}))
    results = check_results(batch.rubric, run.records, run.answers)
    points = {r.name: r.points for r in results}
    feedback = lost_points(results)
    if run.status == "ok" and not any(points.values()) and not run.records and not run.ignored:
        run.status, run.reason = "no-records", "the notebook recorded nothing (record cells " \
                                               "missing?)"
    if run.ignored:
        detail["notes"].append(f"ignored {run.ignored} record(s) not emitted by the lab's own "
                               "record cells")
    if run.killed:
        detail["notes"].append(f"killed {run.killed} process(es) it left running")
    feedback += detail["notes"] + [f"scan warning: {w}" for w in detail["warnings"][:3]]
    if run.status == "flagged":
        feedback, results = [], []
    detail.update(results=results, traceback=run.traceback, reason=run.reason,
                  executed=run.executed)
    reason = run.reason if batch.sandboxed else "; ".join(filter(None, [run.reason, UNSAFE]))
    return {"submission": sub.key, "student": sub.student, "status": run.status,
            "total": sum(points.values()), "max": float(batch.rubric.max_points), **points,
            "reason": reason, "feedback": "; ".join(feedback)}, detail


def grade(submission_dir: str | Path, lab: int | str, out_csv: str | Path,
          timeout_s: float | None = None, rubric: Rubric | str | Path | None = None,
          params: dict | None = None, sandbox: bool = True, *, jobs: int = 1,
          gpus: str | list[str] | None = None, feedback_dir: str | Path | None = None,
          gradebook: str | Path | None = None, deadline: str | datetime | None = None,
          overrides: str | Path | None = None, allow_flagged: tuple[str, ...] = (),
          regrade: bool = False):
    """Grade every submission in ``submission_dir`` against the lab's rubric; write ``out_csv``.

    One row per submission (``labkit.course.submissions``: ``<student>.ipynb`` or
    ``<student>/NN_name.ipynb``): submission, student, status (ok / error / timeout /
    no-records / flagged), total, max, one column of points per check, late, override, reason
    (why the run stopped, or what a flagged submission reached for) and feedback (lost points,
    scan warnings). ``timeout_s`` (default: the rubric's) bounds each notebook's whole run in
    seconds, kernel start included. Executed copies (papermill's cell dropped) go to
    ``<out_csv stem>_executed/``. ``jobs`` submissions run side by side; ``gpus`` (``"0,1"``)
    runs one per GPU at a time instead. ``feedback_dir``: one Markdown file per student
    (``labkit.course.feedback``). ``gradebook``: rows go into that CSV across labs, and
    submissions it graded from the same bytes and rubric are not run again unless ``regrade``.
    ``deadline`` (ISO 8601) marks late rows; ``overrides`` (CSV: student, lab, points, reason)
    are applied last; ``allow_flagged``: students or submissions graded although the scan
    flagged them. ``sandbox=False`` runs submissions with the grader's own rights (trusted work
    only: every row says so); with ``sandbox=True`` and no sandbox here
    (``labkit.course.sandbox.unavailable``) it raises RuntimeError. Returns the rows as a
    DataFrame.
    """
    import pandas as pd

    from labkit.course import gradebook as book
    from labkit.course.feedback import deliver
    from labkit.course.runner import parse_gpus
    from labkit.course.submissions import parse_time
    from labkit.course.workers import side_by_side

    if sandbox and (why := unavailable()):
        raise RuntimeError(f"cannot grade in a sandbox here: {why}; pass --no-sandbox "
                           "(sandbox=False) to grade trusted submissions without isolation")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    rub = rubric if isinstance(rubric, Rubric) else load_rubric(rubric or lab)
    gpu_list, label = parse_gpus(gpus), lab_label(rub.lab)
    due = parse_time(deadline, "deadline") if isinstance(deadline, str) else deadline
    extra = book.read_overrides(overrides)
    subs = find_submissions(submission_dir, Path(rub.notebook).name)
    out_csv = Path(out_csv)
    executed = out_csv.with_name(f"{out_csv.stem}_executed")
    hidden = tuple({Path(p) for p in (submission_dir, executed, out_csv.parent, Path(
        rub.notebook).parent, feedback_dir, gradebook and Path(gradebook).parent) if p})
    batch = Batch(rub, timeout_s or rub.timeout_s, params or {}, executed, sandbox, hidden,
                  frozenset(allow_flagged))
    rubric_hash = book.fingerprint(rub, batch.parameters)
    old = [] if regrade else book.read_book(gradebook)
    done = {s.key: (r, json.loads(r.pop("detail", "{}") or "{}")) for s in subs
            if (r := book.reuse(old, label, s.student, s.sha256, rubric_hash)) is not None
            and not (r["status"] == "flagged" and {s.student, s.key} & batch.allow_flagged)}
    todo = [s for s in subs if s.key not in done]
    with tempfile.TemporaryDirectory(prefix="labkit-grade-") as work:
        if batch.once and todo:  # loads while the first submissions run
            batch.once_checks = batch.trusted_checks(Path(work))
        try:
            done.update(zip([s.key for s in todo], side_by_side(
                lambda s, env: _graded(s, batch, env), todo, jobs, gpu_list)))
        finally:
            if batch.once_checks is not None:
                batch.once_checks.close()
    rows = []
    for sub in subs:
        row, detail = done[sub.key]
        row.update(late=is_late(sub, due), submitted_at=sub.submitted_at.isoformat(
            timespec="seconds"), sha256=sub.sha256, rubric=rubric_hash)
        book.apply_override(row, extra, label)
        rows.append(deliver(row, detail, rub, label, executed, feedback_dir))
    if gradebook is not None:
        book.update(gradebook, label, rows)
    columns = ["submission", "student", "status", "total", "max", *[c.name for c in rub.checks],
               "late", "override", "reason", "feedback"]
    df = pd.DataFrame(rows, columns=columns)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_csv, index=False)
    return df


def _graded(sub: Submission, batch: Batch, env: dict) -> tuple[dict, dict]:
    """``grade_one``, with a grader error turned into that submission's error row."""
    try:
        return grade_one(sub, batch, env)
    except Exception as exc:  # noqa: BLE001 (the batch goes on)
        points = {c.name: 0.0 for c in batch.rubric.checks}
        return ({"submission": sub.key, "student": sub.student, "status": "error", "total": 0.0,
                 "max": float(batch.rubric.max_points), **points,
                 "reason": f"grader error: {type(exc).__name__}: {exc}", "feedback": ""},
                {"reason": "the grader failed on this submission; your instructor has the "
                           "details"})
