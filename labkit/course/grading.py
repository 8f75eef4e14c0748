"""``labkit grade``: run every submission of a lab under papermill and score it against its rubric.

Each submission runs in its own temporary ``notebooks/`` dir (with a copy of ``data/``) in the ci
profile, with a time limit for the whole notebook (``labkit.course.rubric``; the threat model is
in data/rubrics/README.md). Code the student wrote or changed is scanned first
(``labkit.course.tamper``): a submission that reaches for the grader is flagged, not run. Only
records emitted by the lab's own record cells (code unchanged from the released notebook) count;
hidden checks and recomputations run in cells the grader injects, which publish under a per-run
secret nonce (``GRADER_PREFIX``, ``GRADER_KEY`` of ``labkit.records``). Points are summed
per check (partial credit), and a notebook that stops early keeps the points of the records it
produced before.
"""

from __future__ import annotations

import functools
import math
import re
import secrets
import shutil
import tempfile
from pathlib import Path

from labkit.config import DATA_DIR, RUBRIC_DIR
from labkit.course.rubric import Check, Rubric, load_rubric
from labkit.records import GRADER_KEY, GRADER_PREFIX, RECORD_MIME, cell_records

CHECK_TIMEOUT_S = 60  # one hidden test or recomputation; over it, that check fails
GRADE_MARK = "LABKIT_GRADE_RUN"  # environment variable of grading kernels, and their children


# --------------------------------------------------------------------------- preparing a submission
def _norm(source: str) -> str:
    """A cell's code up to comments, quotes and layout (its AST), so a harmless edit to a lab's
    record cell keeps it trusted; text that does not parse is compared line by line."""
    import ast

    from labkit.course.tamper import strip_magics

    try:
        return ast.dump(ast.parse(strip_magics(source)))
    except SyntaxError:
        return "\n".join(line.rstrip() for line in source.strip().splitlines())


def _student_cells(rubric: Rubric) -> tuple[str, ...]:
    """Code cell sources of the student version of the lab's notebook (read once per file)."""
    path = Path(rubric.notebook)
    return _student_cells_of(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _student_cells_of(path: str, _mtime_ns: int) -> tuple[str, ...]:
    import nbformat

    from labkit.course.assign import student_notebook

    nb = student_notebook(nbformat.read(path, as_version=4))
    return tuple(c.source for c in nb.cells if c.cell_type == "code")


def record_cells(rubric: Rubric) -> list[str]:
    """Sources of the lab's record cells, as students receive them."""
    return [src for src in _student_cells(rubric) if re.search(r"\brecord\(", src)]


def trusted_sources(rubric: Rubric) -> set[str]:
    """The record cells, normalized (``_norm``): only cells with one of these codes may record."""
    return {_norm(src) for src in record_cells(rubric)}


def given_sources(rubric: Rubric) -> set[str]:
    """Every code cell of the notebook students receive (normalized): the lab's own code."""
    return {_norm(src) for src in _student_cells(rubric)}


def tampering(nb, given: set[str]) -> list[str]:
    """``labkit.course.tamper.scan`` findings in the code cells the student wrote or changed
    (cells in ``given``, the distributed notebook's, are the lab's own code), as
    ``cell N line M: ...``."""
    from labkit.course.tamper import scan

    return [f"cell {i} {finding}" for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and _norm(c.source) not in given
            for finding in scan(c.source)]


def _grader_cell(nonce: str, check: Check, role: str):
    """A cell that runs a hidden test (``exec``) or a recomputation (``eval``) on a copy of the
    student's globals and publishes the outcome under the nonce, bypassing patchable helpers
    (builtins by module, not by name). A check that runs over ``CHECK_TIMEOUT_S`` fails alone;
    the notebook goes on."""
    import nbformat

    name = f"{GRADER_PREFIX}{nonce}:{role}:{check.name}"
    mode, text = ("exec", check.code) if role == "hidden" else ("eval", check.recompute)
    result = '{"passed": True}' if role == "hidden" else '{"value": _out}'
    fn = f"_lk_grader_{nonce}"
    src = f"""# labkit grader: {role} check {check.name!r}
def {fn}(_g):
    import builtins as _b
    import json
    import signal
    from IPython.core.getipython import get_ipython

    def emit(payload):
        value = json.loads(json.dumps(payload, default=lambda o: o.item() if hasattr(o, "item")
                                      else repr(o)))
        get_ipython().display_pub.publish(
            data={{{RECORD_MIME!r}: {{"name": {name!r}, "value": value}},
                  "text/plain": "labkit grader " + {check.name!r}}}, metadata={{}})
    def late(*_args):
        raise TimeoutError("took longer than {CHECK_TIMEOUT_S} s")

    before = signal.signal(signal.SIGALRM, late)
    signal.alarm({CHECK_TIMEOUT_S})
    try:
        _out = _b.{mode}(_b.compile({text!r}, {f'<{role} check {check.name}>'!r}, {mode!r}),
                         _b.dict(_g))
    except _b.Exception as exc:
        emit({{"passed": False, "error": f"{{_b.type(exc).__name__}}: {{exc}}"}})
    else:
        emit({result})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
{fn}(globals())
del {fn}
"""
    cell = nbformat.v4.new_code_cell(src)
    cell.metadata[GRADER_KEY] = {"nonce": nonce, "check": check.name, "role": role}
    return cell


def prepare_submission(nb, rubric: Rubric, nonce: str, trusted: set[str]):
    """Clear outputs, drop forged grader metadata, inject hidden-test and recompute cells."""
    for cell in nb.cells:
        cell.metadata.pop(GRADER_KEY, None)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    inserts: list[tuple[int, object]] = []
    for check in rubric.checks:
        if check.kind == "hidden":
            pos = next((i + 1 for i, c in enumerate(nb.cells) if c.cell_type == "code"
                        and check.after and check.after in c.source
                        and _norm(c.source) not in trusted), len(nb.cells))
            inserts.append((pos, _grader_cell(nonce, check, "hidden")))
        elif check.recompute:
            pattern = re.compile(rf"""record\(\s*['"]{re.escape(check.record)}['"]""")
            inserts += [(i + 1, _grader_cell(nonce, check, "recompute"))
                        for i, c in enumerate(nb.cells) if c.cell_type == "code"
                        and pattern.search(c.source) and _norm(c.source) in trusted]
    # From the end, so earlier positions stay valid; checks at one position keep rubric order.
    for _, pos, cell in sorted(((i, p, c) for i, (p, c) in enumerate(inserts)),
                               key=lambda x: (x[1], x[0]), reverse=True):
        nb.cells.insert(pos, cell)
    return nb


# --------------------------------------------------------------------------- scoring
def _same(a, b, check: Check) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        tol = (check.rel_tol, check.abs_tol) if check.op == "close" else (1e-9, 0.0)
        return math.isclose(a, b, rel_tol=tol[0], abs_tol=tol[1])
    return a == b


def _passes(value, check: Check) -> tuple[bool, str]:
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


def score(nb, rubric: Rubric, nonce: str, trusted: set[str]) -> tuple[dict, list[str], int]:
    """Points per check of an executed notebook, feedback lines, and how many records were
    ignored (from cells that are not the lab's record cells, or forged grader names)."""
    student, grader, ignored = {}, {}, 0
    for cell in nb.cells:
        meta = cell.get("metadata", {}).get(GRADER_KEY) or {}
        mine = meta.get("nonce") == nonce
        for payload in cell_records(cell):
            name = payload.get("name", "")
            if mine and name.startswith(f"{GRADER_PREFIX}{nonce}:"):
                grader[name.removeprefix(f"{GRADER_PREFIX}{nonce}:")] = payload.get("value")
            elif not mine and not name.startswith(GRADER_PREFIX) and _norm(cell.source) in trusted:
                student[name] = payload.get("value")
            else:
                ignored += 1
    points, feedback = {}, []
    for check in rubric.checks:
        ok, why = False, ""
        if check.kind == "hidden":
            res = grader.get(f"hidden:{check.name}")
            ok = isinstance(res, dict) and res.get("passed") is True
            why = "hidden test did not run (the notebook stopped before it)" if res is None \
                else res.get("error", "")
        elif check.record not in student:
            why = f"no record {check.record!r} from the lab's record cell"
        else:
            value = student[check.record]
            if check.key is not None:
                value = value.get(check.key) if isinstance(value, dict) else None
            ok, why = _passes(value, check)
            if ok and check.recompute:
                res = grader.get(f"recompute:{check.name}") or {}
                if "value" not in res:
                    ok, why = False, f"could not recompute {check.recompute!r}: " \
                                     f"{res.get('error', 'not run')}"
                elif not _same(res["value"], student[check.record], check):
                    ok, why = False, (f"recorded {student[check.record]!r} but {check.recompute}"
                                      f" gives {res['value']!r}")
        points[check.name] = float(check.points) if ok else 0.0
        if not ok:
            feedback.append(f"{check.name}: {check.feedback} ({why})".replace(" ()", ""))
    return points, feedback, ignored


def _reason(failure, timeout_s: float) -> tuple[str, str]:
    if failure is None:
        return "ok", ""
    where = f"cell {failure.cell_index}"
    if failure.grader_cell:
        where = f"{failure.grader_cell['role']} check {failure.grader_cell['check']!r} " \
                f"(run before cell {failure.cell_index})"
    if failure.timed_out:
        return "timeout", f"timed out after {timeout_s:g} s in {where}"
    return "error", f"{failure.ename} in {where}: {failure.evalue}"


def grade_one(path: Path, rubric: Rubric, trusted: set[str], timeout_s: float,
              params: dict, executed_dir: Path | None = None, given: set[str] | None = None,
              kernel_name: str | None = None) -> dict:
    """Run and score one submission; one CSV row (never raises for a broken submission).

    ``given``: the distributed notebook's cells (``given_sources``); code outside them is
    scanned first (``tampering``) and a submission with findings is not run: status
    ``flagged``, zero points, the findings as reason. ``kernel_name``: the kernel to run it in.
    """
    import nbformat

    from labkit.course.runner import PROFILE_PARAMETER, execute

    row = {"submission": path.name}
    nonce = secrets.token_hex(8)
    flagged: list[str] = []
    with tempfile.TemporaryDirectory(prefix="labkit-grade-") as tmp:
        work = Path(tmp) / "notebooks"
        work.mkdir()
        if DATA_DIR.is_dir():  # the lab's data, without the rubrics (answers, hidden checks)
            shutil.copytree(DATA_DIR, Path(tmp) / "data",
                            ignore=shutil.ignore_patterns(RUBRIC_DIR.name))
        try:
            nb = nbformat.read(path, as_version=4)
        except Exception as exc:
            nb, failure, status, reason = None, None, "error", f"unreadable notebook: {exc}"
        if nb is not None and given is not None:
            flagged = tampering(nb, given)
        if flagged:
            status = "flagged"
            reason = ("not run: reaches for the grader, an instructor should look at it ("
                      + "; ".join(flagged[:5]) + (" ..." if len(flagged) > 5 else "") + ")")
            nb = None
        elif nb is not None:
            nbformat.write(prepare_submission(nb, rubric, nonce, trusted), work / path.name)
            ex = execute(work / path.name, work / f"executed-{path.name}",
                         parameters={PROFILE_PARAMETER: "ci", **rubric.parameters, **params},
                         cwd=work, total_timeout_s=timeout_s, kernel_name=kernel_name)
            failure = ex.failure
            status, reason = _reason(failure, timeout_s)
            try:
                nb = nbformat.read(ex.output, as_version=4)
            except Exception:
                nb = nbformat.v4.new_notebook()
            if executed_dir is not None:
                executed_dir.mkdir(parents=True, exist_ok=True)
                nbformat.write(nb, executed_dir / path.name)
        points, feedback, ignored = score(nb or nbformat.v4.new_notebook(), rubric, nonce,
                                          trusted)
    if status == "ok" and not any(points.values()) and ignored == 0 and not _has_records(nb):
        status, reason = "no-records", "the notebook recorded nothing (record cells missing?)"
    if ignored:
        feedback.append(f"ignored {ignored} record(s) not emitted by the lab's own record cells")
    if flagged:
        feedback = []
    row.update(status=status, total=sum(points.values()), max=float(rubric.max_points), **points,
               reason=reason, feedback="; ".join(feedback))
    return row


def _has_records(nb) -> bool:
    return nb is not None and any(cell_records(c) for c in nb.cells)


def grade(submission_dir: str | Path, lab: int | str, out_csv: str | Path,
          timeout_s: float | None = None, rubric: Rubric | str | Path | None = None,
          params: dict | None = None):
    """Grade every ``*.ipynb`` in ``submission_dir`` against the lab's rubric; write ``out_csv``.

    One row per submission: submission, status (ok / error / timeout / no-records / flagged),
    total, max, one column of points per check, reason (why the run stopped, or what a flagged
    submission reached for) and feedback (lost points). ``timeout_s`` (default: the rubric's)
    bounds each notebook's run in seconds, kernel start included. Executed copies go to
    ``<out_csv stem>_executed/``. Each kernel carries a per-run mark in its environment; after
    each submission, processes with that mark still running (a detached child, a Ray cluster
    of a notebook that timed out) are killed. Returns the rows as a DataFrame.
    """
    import pandas as pd

    rub = rubric if isinstance(rubric, Rubric) else load_rubric(rubric or lab)
    subs = sorted(Path(submission_dir).glob("*.ipynb"))
    if not subs:
        raise FileNotFoundError(f"no *.ipynb submissions in {str(submission_dir)!r}")
    from labkit.course.kernels import prepare_kernel, remove_kernel
    from labkit.processes import kill_marked

    trusted, given = trusted_sources(rub), given_sources(rub)
    out_csv = Path(out_csv)
    executed = out_csv.with_name(f"{out_csv.stem}_executed")
    mark = secrets.token_hex(8)
    kernel = prepare_kernel({GRADE_MARK: mark})
    rows = []
    try:
        for p in subs:
            row = grade_one(p, rub, trusted, timeout_s or rub.timeout_s, params or {}, executed,
                            given, kernel)
            if (left := kill_marked(GRADE_MARK, mark)):
                row["feedback"] = "; ".join(filter(None, [
                    row["feedback"], f"killed {left} process(es) it left running"]))
            rows.append(row)
    finally:
        remove_kernel(kernel)
    columns = ["submission", "status", "total", "max", *[c.name for c in rub.checks],
               "reason", "feedback"]
    df = pd.DataFrame(rows, columns=columns)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_csv, index=False)
    return df
