"""``labkit grade``: run every submission of a lab in a sandbox and score it against its rubric.

A submission goes through four steps (the threat model is in data/rubrics/README.md):

1. The static scan (``labkit.course.tamper``) of the cells the student wrote or changed: one
   that reaches for the grader is flagged, not run.
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
the records it produced and of the exercises it reached.
"""

from __future__ import annotations

import functools
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from labkit.course.rubric import Rubric, load_rubric
from labkit.course.sandbox import Limits, make_box, remove_box, unavailable
from labkit.course.scoring import normalized, passes, recorded, score, student_records

CHECK_TIMEOUT_S = 60  # one hidden test or recomputation (s; a rubric's check_timeout_s wins)
GRADE_MARK = "LABKIT_GRADE_RUN"  # environment variable of grading kernels (--no-sandbox clean-up)
UNSAFE = "graded without a sandbox (--no-sandbox): its code ran with the grader's rights"


# --------------------------------------------------------------------------- the released lab
@functools.lru_cache(maxsize=16)
def _released(path: str, _mtime_ns: int) -> tuple[tuple[str, ...], str, tuple[str, ...]]:
    """Of a solution notebook: the code cells students receive, the released parameters cell,
    and the graded names (read once per file version)."""
    import nbformat

    from labkit.course.assign import student_notebook
    from labkit.course.trusted import graded_names, parameters_source

    solution = nbformat.read(path, as_version=4)
    nb = student_notebook(solution)
    return (tuple(c.source for c in nb.cells if c.cell_type == "code"), parameters_source(nb),
            graded_names(solution))


def _lab(rubric: Rubric) -> tuple[tuple[str, ...], str, tuple[str, ...]]:
    return _released(str(rubric.notebook), Path(rubric.notebook).stat().st_mtime_ns)


def record_cells(rubric: Rubric) -> list[str]:
    """Sources of the lab's record cells, as students receive them."""
    return [src for src in _lab(rubric)[0] if re.search(r"\brecord\(", src)]


def trusted_sources(rubric: Rubric) -> set[str]:
    """The record cells, normalized (``normalized``): only cells with one of these codes record."""
    return {normalized(src) for src in record_cells(rubric)}


def given_sources(rubric: Rubric) -> set[str]:
    """Every code cell of the notebook students receive (normalized): the lab's own code."""
    return {normalized(src) for src in _lab(rubric)[0]}


def tampering(nb, given: set[str]) -> list[str]:
    """``labkit.course.tamper.scan`` findings in the code cells the student wrote or changed
    (cells in ``given``, the distributed notebook's, are the lab's own code), as
    ``cell N line M: ...``."""
    from labkit.course.tamper import scan

    return [f"cell {i} {finding}" for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and normalized(c.source) not in given
            for finding in scan(c.source)]


# --------------------------------------------------------------------------- running
def _reason(failure, timeout_s: float, limits: Limits) -> tuple[str, str]:
    if failure is None:
        return "ok", ""
    where = f"cell {failure.cell_index}"
    if failure.timed_out:
        return "timeout", f"timed out after {timeout_s:g} s in {where}"
    hint = f" (the sandbox allows {limits.describe()})" \
        if failure.ename in ("MemoryError", "DeadKernelError") else ""
    return "error", f"{failure.ename} in {where}" + (f": {failure.evalue}" if failure.evalue
                                                     else "") + hint


@dataclass
class Batch:
    """What every submission of one ``grade`` call shares."""

    rubric: Rubric
    timeout_s: float
    params: dict
    executed_dir: Path | None = None
    sandboxed: bool = True
    hidden: tuple[Path, ...] = ()  # paths no sandbox may show (submissions, grade file, ...)
    mark: str = field(default_factory=lambda: secrets.token_hex(8))
    trusted: set[str] = field(init=False)  # the record cells (normalized)
    given: set[str] = field(init=False)  # every released code cell (normalized)
    parameters_cell: str = field(init=False)  # the released parameters cell
    graded: tuple[str, ...] = field(init=False)  # names the trusted interpreter takes
    once: dict[str, list[str]] = field(init=False)  # trusted checks no student code enters
    student_setup: bool = field(init=False)  # whether the other checks read the setup's names
    once_checks: object = None  # the trusted interpreter of ``once`` (a TrustedChecks)
    once_answers: dict | None = None  # its answers, once asked

    def __post_init__(self) -> None:
        from labkit.course.trusted import names

        self.trusted, self.given = trusted_sources(self.rubric), given_sources(self.rubric)
        _, self.parameters_cell, self.graded = _lab(self.rubric)
        setup_names = names(self.rubric.setup)[1]
        self.once, self.student_setup = {}, False
        for key, (role, code) in _trusted_checks(self.rubric).items():
            reads = names(code, "exec" if role == "hidden" else "eval")[0]
            if reads & {*self.graded, "records"}:
                self.student_setup |= bool(reads & setup_names)
            else:  # its value is the same for every submission: computed once per batch
                self.once[key] = [role, code]

    @property
    def parameters(self) -> dict:
        """The notebook parameters of every run: PROFILE="ci", the rubric's, the caller's."""
        from labkit.course.runner import PROFILE_PARAMETER

        return {PROFILE_PARAMETER: "ci", **self.rubric.parameters, **self.params}

    @property
    def check_timeout_s(self) -> float:
        return self.rubric.check_timeout_s or CHECK_TIMEOUT_S

    def trusted_checks(self, work: Path, setup: bool = True):
        """A trusted interpreter (``labkit.course.trusted.TrustedChecks``) started in ``work``
        with the lab's parameters and, if ``setup``, the rubric's setup."""
        from labkit.course.trusted import TrustedChecks

        return TrustedChecks(work, {"parameters": self.parameters_cell, "overrides":
                                    self.parameters, "setup": self.rubric.setup if setup else ""},
                             sandboxed=self.sandboxed, limits=self.rubric.limits,
                             setup_timeout_s=self.timeout_s, hidden=self.hidden)

    def once_answer(self) -> dict[str, dict]:
        """The answers to ``once``, from the interpreter ``grade`` started for them (asked the
        first time they are needed, then kept)."""
        if self.once_answers is None:
            self.once_answers = self.once_checks.run(
                {"definitions": [], "graded": [], "records": {}, "checks": self.once},
                list(self.once), self.check_timeout_s)
            self.once_checks.close()
        return self.once_answers


def _execute(nb, name: str, tmp: Path, batch: Batch):
    """Run one submission's notebook in its kernel (sandboxed unless told otherwise); the
    executed notebook, the failure (or None) and how many processes had to be killed after."""
    import nbformat

    from labkit.course.kernels import prepare_kernel, remove_kernel, sandboxed_kernel, stop_kernel
    from labkit.course.runner import execute
    from labkit.processes import best_effort, kill_marked

    for cell in nb.cells:  # pre-filled outputs count for nothing
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    src, dst = tmp / name, tmp / f"executed-{name}"  # outside the box: the kernel cannot reach
    nbformat.write(nb, src)
    box, manager, env = None, None, {GRADE_MARK: batch.mark}
    if batch.sandboxed:
        box = make_box(tmp, "kernel")
        kernel, manager = sandboxed_kernel(box, batch.rubric.limits, env, batch.hidden)
        cwd = box.work
    else:
        kernel, cwd = prepare_kernel(env), tmp / "notebooks"
        cwd.mkdir()
    try:
        ex = execute(src, dst, parameters=batch.parameters, cwd=cwd,
                     total_timeout_s=batch.timeout_s, kernel_name=kernel, kernel_manager=manager)
    finally:
        if box is not None:
            best_effort(lambda: stop_kernel(manager))
            remove_kernel(kernel)
        killed = remove_box(box) if box is not None else kill_marked(GRADE_MARK, batch.mark)
    try:
        out = nbformat.read(ex.output, as_version=4)
    except Exception:  # noqa: BLE001 (no output notebook: nothing was recorded)
        out = nbformat.v4.new_notebook()
    if batch.executed_dir is not None:
        batch.executed_dir.mkdir(parents=True, exist_ok=True)
        nbformat.write(out, batch.executed_dir / name)
    return out, ex.failure, killed


def _trusted_checks(rubric: Rubric) -> dict[str, list[str]]:
    """``{key: [role, code]}`` of a rubric's hidden tests and recomputations."""
    return {**{f"hidden:{c.name}": ["hidden", c.code] for c in rubric.checks
               if c.kind == "hidden"},
            **{f"recompute:{c.name}": ["recompute", c.recompute] for c in rubric.checks
               if c.kind == "record" and c.recompute}}


def _wanted(batch: Batch, nb, failure, records: dict) -> dict[str, list[str]]:
    """The trusted checks to run: hidden tests whose anchor cell ran before the notebook
    stopped, recomputations of records that meet their check; ``{key: [role, code]}``."""
    from labkit.course.runner import source_index
    from labkit.course.trusted import ran

    stop = None if failure is None else failure.cell_index
    reached = [c.source for i, c in enumerate(nb.cells) if ran(c)
               and (stop is None or source_index(nb, i) < stop)]
    wanted = {}
    for check in batch.rubric.checks:
        if check.kind == "hidden" and (any(check.after in s for s in reached) if check.after
                                       else failure is None):
            wanted[f"hidden:{check.name}"] = ["hidden", check.code]
        elif check.kind == "record" and check.recompute and check.record in records \
                and passes(recorded(check, records), check)[0]:
            wanted[f"recompute:{check.name}"] = ["recompute", check.recompute]
    return wanted


def _run(nb, name: str, tmp: Path, batch: Batch):
    """Run a submission that passed the scan: its kernel, and meanwhile its trusted interpreter
    (started at once, so its set-up overlaps the notebook; without the setup when its checks do
    not need it), asked for the checks the notebook reached. ``(status, reason, records,
    ignored, answers, processes killed)``."""
    from labkit.course.trusted import definitions

    mine = len(_trusted_checks(batch.rubric)) > len(batch.once)
    checks = batch.trusted_checks(tmp, batch.student_setup) if mine else None
    answers: dict = {}
    try:
        nb, failure, killed = _execute(nb, name, tmp, batch)
        records, ignored = student_records(nb, batch.trusted)
        wanted = _wanted(batch, nb, failure, records)
        if (own := {k: v for k, v in wanted.items() if k not in batch.once}):
            answers = checks.run({"definitions": definitions(nb, batch.graded),
                                  "graded": batch.graded, "records": records, "checks": own},
                                 list(own), batch.check_timeout_s)
        if wanted.keys() & batch.once.keys():
            answers.update({k: v for k, v in batch.once_answer().items() if k in wanted})
    finally:
        if checks is not None:
            checks.close()
    killed += 0 if checks is None else checks.killed
    return (*_reason(failure, batch.timeout_s, batch.rubric.limits), records, ignored, answers,
            killed)


def grade_one(path: Path, batch: Batch) -> dict:
    """Run and score one submission; one CSV row (never raises for a broken submission)."""
    import nbformat

    records, ignored, answers, killed, status, reason = {}, 0, {}, 0, "ok", ""
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as exc:  # noqa: BLE001 (a broken file is a graded row)
        nb, status, reason = None, "error", f"unreadable notebook: {exc}"
    flagged = tampering(nb, batch.given) if nb is not None else []
    if flagged:
        status = "flagged"
        reason = ("not run: reaches for the grader, an instructor should look at it ("
                  + "; ".join(flagged[:5]) + (" ..." if len(flagged) > 5 else "") + ")")
    elif nb is not None:
        with tempfile.TemporaryDirectory(prefix="labkit-grade-") as tmp:
            status, reason, records, ignored, answers, killed = _run(nb, path.name, Path(tmp),
                                                                     batch)
    points, feedback = score(batch.rubric, records, answers)
    if status == "ok" and not any(points.values()) and not records and not ignored:
        status, reason = "no-records", "the notebook recorded nothing (record cells missing?)"
    if ignored:
        feedback.append(f"ignored {ignored} record(s) not emitted by the lab's own record cells")
    if killed:
        feedback.append(f"killed {killed} process(es) it left running")
    if flagged:
        feedback = []
    reason = reason if batch.sandboxed else "; ".join(filter(None, [reason, UNSAFE]))
    return {"submission": path.name, "status": status, "total": sum(points.values()),
            "max": float(batch.rubric.max_points), **points, "reason": reason,
            "feedback": "; ".join(feedback)}


def grade(submission_dir: str | Path, lab: int | str, out_csv: str | Path,
          timeout_s: float | None = None, rubric: Rubric | str | Path | None = None,
          params: dict | None = None, sandbox: bool = True):
    """Grade every ``*.ipynb`` in ``submission_dir`` against the lab's rubric; write ``out_csv``.

    One row per submission: submission, status (ok / error / timeout / no-records / flagged),
    total, max, one column of points per check, reason (why the run stopped, or what a flagged
    submission reached for) and feedback (lost points). ``timeout_s`` (default: the rubric's)
    bounds each notebook's run in seconds, kernel start included. Executed copies go to
    ``<out_csv stem>_executed/``. ``sandbox=False`` runs submissions with the grader's own
    rights (trusted work only: every row says so); with ``sandbox=True`` and no sandbox here
    (``labkit.course.sandbox.unavailable``) it raises RuntimeError. Returns the rows as a
    DataFrame.
    """
    import pandas as pd

    if sandbox and (why := unavailable()):
        raise RuntimeError(f"cannot grade in a sandbox here: {why}; pass --no-sandbox "
                           "(sandbox=False) to grade trusted submissions without isolation")
    rub = rubric if isinstance(rubric, Rubric) else load_rubric(rubric or lab)
    subs = sorted(Path(submission_dir).glob("*.ipynb"))
    if not subs:
        raise FileNotFoundError(f"no *.ipynb submissions in {str(submission_dir)!r}")
    out_csv = Path(out_csv)
    executed = out_csv.with_name(f"{out_csv.stem}_executed")
    hidden = tuple({Path(submission_dir), executed, out_csv.parent, Path(rub.notebook).parent})
    batch = Batch(rub, timeout_s or rub.timeout_s, params or {}, executed, sandbox, hidden)
    with tempfile.TemporaryDirectory(prefix="labkit-grade-") as work:
        if batch.once:  # loads while the first submission runs
            batch.once_checks = batch.trusted_checks(Path(work))
        try:
            rows = [grade_one(p, batch) for p in subs]
        finally:
            if batch.once_checks is not None:
                batch.once_checks.close()
    columns = ["submission", "status", "total", "max", *[c.name for c in rub.checks],
               "reason", "feedback"]
    df = pd.DataFrame(rows, columns=columns)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_csv, index=False)
    return df
