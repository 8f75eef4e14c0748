"""One ``labkit grade`` batch (``Batch``: what its submissions share) and running one
submission in it (``run_submission``): its kernel in a sandbox, its trusted interpreter beside
it, the checks the notebook reached. ``labkit.course.grading`` scans, scores and writes; the
steps are described there and in data/rubrics/README.md.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

from labkit.course.released import given_sources, released_lab, trusted_sources
from labkit.course.rubric import Rubric
from labkit.course.sandbox import Limits, make_box, remove_box
from labkit.course.scoring import passes, recorded, student_records

CHECK_TIMEOUT_S = 60  # one hidden test or recomputation (s; a rubric's check_timeout_s wins)
GRADE_MARK = "LABKIT_GRADE_RUN"  # environment variable of grading kernels (--no-sandbox clean-up)


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
    allow_flagged: frozenset[str] = frozenset()  # students / submissions graded despite the scan
    mark: str = field(default_factory=lambda: secrets.token_hex(8))
    trusted: set[str] = field(init=False)  # the record cells (normalized)
    given: set[str] = field(init=False)  # every released code cell (normalized)
    parameters_cell: str = field(init=False)  # the released parameters cell
    graded: tuple[str, ...] = field(init=False)  # names the trusted interpreter takes
    once: dict[str, list[str]] = field(init=False)  # trusted checks no student code enters
    student_setup: bool = field(init=False)  # whether the other checks read the setup's names
    once_checks: object = None  # the trusted interpreter of ``once`` (a TrustedChecks)
    once_answers: dict | None = None  # its answers, once asked
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards ``once`` (jobs > 1)

    def __post_init__(self) -> None:
        from labkit.course.trusted import names

        self.trusted, self.given = trusted_sources(self.rubric), given_sources(self.rubric)
        _, self.parameters_cell, self.graded = released_lab(self.rubric)
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

    def trusted_checks(self, work: Path, setup: bool = True, env: dict | None = None):
        """A trusted interpreter (``labkit.course.trusted.TrustedChecks``) started in ``work``
        with the lab's parameters and, if ``setup``, the rubric's setup (``env``: extra
        variables)."""
        from labkit.course.trusted import TrustedChecks

        return TrustedChecks(work, {"parameters": self.parameters_cell, "overrides":
                                    self.parameters, "setup": self.rubric.setup if setup else ""},
                             sandboxed=self.sandboxed, limits=self.rubric.limits,
                             setup_timeout_s=self.timeout_s, hidden=self.hidden, env=env)

    def once_answer(self) -> dict[str, dict]:
        """The answers to ``once``, from the interpreter ``grade`` started for them (asked the
        first time they are needed, then kept; one thread asks, the others wait)."""
        with self.lock:
            if self.once_answers is None:
                self.once_answers = self.once_checks.run(
                    {"definitions": [], "graded": [], "records": {}, "checks": self.once},
                    list(self.once), self.check_timeout_s)
                self.once_checks.close()
        return self.once_answers


def _execute(nb, name: str, tmp: Path, batch: Batch, env: dict):
    """Run one submission's notebook in its kernel (sandboxed unless told otherwise; ``env``:
    extra variables); the executed notebook, the failure (or None) and how many processes had to
    be killed after."""
    import nbformat

    from labkit.course.kernels import prepare_kernel, remove_kernel, sandboxed_kernel, stop_kernel
    from labkit.course.runner import execute
    from labkit.processes import best_effort, kill_marked

    for cell in nb.cells:  # pre-filled outputs count for nothing
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    src, dst = tmp / name, tmp / f"executed-{name}"  # outside the box: the kernel cannot reach
    nbformat.write(nb, src)
    mark = f"{batch.mark}-{secrets.token_hex(4)}"  # this run's: others may run meanwhile
    box, manager, env = None, None, {**env, GRADE_MARK: mark}
    if batch.sandboxed:
        box = make_box(tmp, f"kernel-{secrets.token_hex(4)}")  # names its kernel spec
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
        killed = remove_box(box) if box is not None else kill_marked(GRADE_MARK, mark)
    try:
        out = nbformat.read(ex.output, as_version=4)
    except Exception:  # noqa: BLE001 (no output notebook: nothing was recorded)
        out = nbformat.v4.new_notebook()
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


@dataclass
class Outcome:
    """What running one submission gave: status and reason, records (and how many were
    ignored), the trusted answers, processes killed, the executed notebook and the first
    traceback (in the student's cell numbers)."""

    status: str = "ok"
    reason: str = ""
    records: dict = field(default_factory=dict)
    ignored: int = 0
    answers: dict = field(default_factory=dict)
    killed: int = 0
    executed: object = None
    traceback: str = ""


def run_submission(nb, name: str, tmp: Path, batch: Batch, env: dict) -> Outcome:
    """Run a submission that passed the scan: its kernel, and meanwhile its trusted interpreter
    (started at once, so its set-up overlaps the notebook; without the setup when its checks do
    not need it), asked for the checks the notebook reached."""
    from labkit.course.feedback import renumber_traceback
    from labkit.course.trusted import definitions

    mine = len(_trusted_checks(batch.rubric)) > len(batch.once)
    checks = batch.trusted_checks(tmp, batch.student_setup, env) if mine else None
    answers: dict = {}
    try:
        nb, failure, killed = _execute(nb, name, tmp, batch, env)
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
    status, reason = _reason(failure, batch.timeout_s, batch.rubric.limits)
    trace = renumber_traceback(failure.traceback, nb) if failure is not None else ""
    return Outcome(status, reason, records, ignored, answers, killed, nb, trace)
