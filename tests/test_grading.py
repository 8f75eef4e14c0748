"""Grading end to end: one batch of submissions of a tiny lab, each scored the way it deserves.

The batch holds the solution (full marks, also with a comment added to its record cell), the
untouched student version (only the set-up point), one that raises (keeps what it earned before
the error), one that loops forever (timeout), one whose hidden test hangs (only that check
fails), one that forges records at run time (no points for them), one whose code reaches for
the grader (flagged, not run), and one with a shell line (a warning, full marks). The batch runs
two at a time in the sandbox (skipped where none can be had), with feedback files, a gradebook
and a deadline; a second ``labkit grade`` on it regrades only what changed, applies an override
and grades the flagged one on request. The hostile submissions are in test_hostile_grading.py.
Rubric validation, the release's cell numbers and the repository's own rubrics are checked
without running anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from fixtures.fixture_lab import RECORD_CELL, write_fixture_lab
from nbformat.v4 import new_code_cell

from labkit.config import RUBRIC_DIR
from labkit.course.assign import make_student_notebooks
from labkit.course.grading import record_cells
from labkit.course.rubric import load_rubric
from labkit.course.sandbox import unavailable
from labkit.records import RECORD_MIME

FORGERY = '''import labkit
labkit.record("add_n_4", 7)         # a record from a cell that is not a check cell'''
TAMPERING = '''import labkit
exec = lambda *a, **k: None                          # the grader's hidden tests "pass"
eval = lambda *a, **k: 7                             # and its recomputation agrees
_real = labkit.record                        # make the real record cell lie
labkit.record = lambda name, value: _real(name, 7 if name == "add_n_4" else value)'''


EARLY = datetime(2025, 6, 1, tzinfo=UTC)  # the solution's file time: before the deadline
DEADLINE = "2026-01-01T00:00:00+00:00"  # every other file is written after it
GRADED: dict = {}  # where the graded fixture put its folders (for the feedback tests)


def _cell_index(nb, text: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if text in c.source)


@pytest.fixture(scope="module")
def graded(tmp_path_factory) -> pd.DataFrame:
    """The batch graded once: a kernel per submission, so the tests that use it are slow."""
    if (why := unavailable()) is not None:
        pytest.skip(f"no sandbox here: {why}")
    tmp = tmp_path_factory.mktemp("grading")
    solution, rubric = write_fixture_lab(tmp / "lab")
    [student] = make_student_notebooks(tmp / "lab", tmp / "release", pattern="99_*.ipynb")
    subs = tmp / "submissions"
    subs.mkdir()
    shutil.copy(solution, subs / "solution.ipynb")
    shutil.copy(student, subs / "student.ipynb")

    nb = nbformat.read(solution, as_version=4)
    nb.cells.insert(_cell_index(nb, RECORD_CELL), new_code_cell('raise RuntimeError("my bug")'))
    nbformat.write(nb, subs / "raises.ipynb")

    nb = nbformat.read(student, as_version=4)
    nb.cells[_cell_index(nb, "def add(")].source = "def add(a, b):\n    while True:\n        pass"
    nbformat.write(nb, subs / "loops.ipynb")

    nb = nbformat.read(student, as_version=4)
    ex = _cell_index(nb, "def add(")
    nb.cells[ex].source = "def add(a, b):\n    return a - b"
    del nb.cells[_cell_index(nb, "assert add(2, 3)")]          # drop the visible check
    forged = new_code_cell(FORGERY)
    forged.metadata["labkit_grader"] = {"nonce": "0123456789abcdef", "check": "add_hidden",
                                        "role": "hidden"}
    nb.cells.insert(ex + 1, forged)
    rec = nb.cells[_cell_index(nb, RECORD_CELL)]              # a pre-filled, forged output
    rec.outputs = [nbformat.v4.new_output("display_data", data={
        RECORD_MIME: {"name": "add_n_4", "value": 7}, "text/plain": "recorded"})]
    nbformat.write(nb, subs / "forged.ipynb")
    nb.cells[ex + 1] = new_code_cell(TAMPERING)
    nbformat.write(nb, subs / "tampered.ipynb")

    nb = nbformat.read(solution, as_version=4)                # a comment and other quotes
    rec = nb.cells[_cell_index(nb, RECORD_CELL)]
    rec.source = "# my result\n" + rec.source.replace('"add_n_4"', "'add_n_4'")
    nbformat.write(nb, subs / "commented.ipynb")

    nb = nbformat.read(student, as_version=4)                 # right, but hangs on a < 0
    nb.cells[_cell_index(nb, "def add(")].source = (
        "def add(a, b):\n    while a < 0:\n        pass\n    return a + b")
    nbformat.write(nb, subs / "slow_hidden.ipynb")

    nb = nbformat.read(solution, as_version=4)                # a shell line: only a warning
    nb.cells.insert(_cell_index(nb, "def add("), new_code_cell("!echo hello from the shell"))
    nbformat.write(nb, subs / "shell.ipynb")
    os.utime(subs / "solution.ipynb", (EARLY.timestamp(), EARLY.timestamp()))

    from labkit.course import batch, grading

    csv = tmp / "grades.csv"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batch, "CHECK_TIMEOUT_S", 1)
        grading.grade(subs, "99", csv, timeout_s=8, rubric=load_rubric(rubric), jobs=2,
                      feedback_dir=tmp / "feedback", gradebook=tmp / "book.csv",
                      deadline=DEADLINE)
    GRADED["tmp"], GRADED["subs"], GRADED["rubric"] = tmp, subs, load_rubric(rubric)
    return pd.read_csv(csv, keep_default_na=False).set_index("submission")


@pytest.mark.slow
def test_solution_gets_full_marks(graded):
    row = graded.loc["solution.ipynb"]
    assert (row.status, row.total, row["max"]) == ("ok", 8, 8)


@pytest.mark.slow
def test_untouched_student_version_scores_zero_on_the_exercise(graded):
    row = graded.loc["student.ipynb"]
    assert (row.setup, row.add_n_4, row.add_hidden, row.add_floats) == (1, 0, 0, 0)
    assert row.status == "error" and "NotImplementedError in cell 5" in row.reason


@pytest.mark.slow
def test_raising_submission_keeps_points_earned_before_the_error(graded):
    row = graded.loc["raises.ipynb"]
    assert (row.setup, row.add_n_4, row.add_hidden, row.add_floats) == (1, 0, 2, 2)
    assert row.status == "error" and row.reason == "RuntimeError in cell 7: my bug"


@pytest.mark.slow
def test_endless_loop_times_out_and_the_batch_goes_on(graded):
    row = graded.loc["loops.ipynb"]
    assert row.status == "timeout" and "timed out after 8 s in cell 5" in row.reason
    assert "TimeoutError" in row.feedback and row.total == 1  # hidden tests stopped first


@pytest.mark.slow
def test_forged_records_earn_nothing(graded):
    row = graded.loc["forged.ipynb"]
    assert (row.setup, row.add_n_4, row.add_hidden, row.add_floats) == (1, 0, 0, 0)
    assert "got -1, expected 7" in row.feedback
    assert "ignored 1 record(s)" in row.feedback


@pytest.mark.slow
def test_code_that_reaches_for_the_grader_is_flagged_and_not_run(graded):
    row = graded.loc["tampered.ipynb"]
    assert (row.status, row.total) == ("flagged", 0)
    for finding in ("rebinds 'exec'", "rebinds 'eval'", "assigns to 'labkit.record'"):
        assert finding in row.reason
    assert row.feedback == ""


@pytest.mark.slow
def test_a_comment_in_a_record_cell_keeps_it_trusted(graded):
    row = graded.loc["commented.ipynb"]
    assert (row.status, row.total) == ("ok", 8)


@pytest.mark.slow
def test_a_hanging_hidden_test_fails_alone(graded):
    row = graded.loc["slow_hidden.ipynb"]
    assert (row.status, row.setup, row.add_n_4, row.add_hidden, row.add_floats) == \
        ("ok", 1, 3, 0, 2)
    assert "TimeoutError: took longer than 1 s" in row.feedback


@pytest.mark.slow
def test_csv_has_one_row_per_submission_and_a_column_per_check(graded):
    assert sorted(graded.index) == ["commented.ipynb", "forged.ipynb", "loops.ipynb",
                                    "raises.ipynb", "shell.ipynb", "slow_hidden.ipynb",
                                    "solution.ipynb", "student.ipynb", "tampered.ipynb"]
    assert list(graded.columns) == ["student", "status", "total", "max", "setup", "add_n_4",
                                    "add_hidden", "add_floats", "late", "override", "reason",
                                    "feedback"]
    assert graded.loc["solution.ipynb", "student"] == "solution"


@pytest.mark.parametrize("change, message", [
    ({"kind": "magic"}, "unknown kind 'magic'; choose one of: record, hidden"),
    ({"op": "approx"}, "unknown op 'approx'; choose one of: equals, close, between, true"),
    ({"points": 0}, "points must be a positive number, got 0"),
    ({"colour": "red"}, "unknown field(s) ['colour']"),
    ({"recompute": "add(N,"}, "Python syntax error in <lab99.json check 1 (add_n_4) recompute>"),
    ({"expected": None}, "op 'equals' needs 'expected'"),
])
def test_bad_rubric_names_the_check_and_the_field(tmp_path, change, message):
    _, toml_path = write_fixture_lab(tmp_path)
    data = tomllib.loads(toml_path.read_text())
    data["check"][1].update(change)
    data["check"][1] = {k: v for k, v in data["check"][1].items() if v is not None}
    path = tmp_path / "lab99.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as err:
        load_rubric(path)
    assert str(err.value).startswith("lab99.json check 1 (add_n_4): ")
    assert message in str(err.value)


def test_a_check_named_like_a_grade_column_is_refused(tmp_path):
    _, rubric = write_fixture_lab(tmp_path)
    rubric.write_text(rubric.read_text().replace('name = "setup"', 'name = "total"'))
    with pytest.raises(ValueError, match="name 'total' is a column of the grade file already"):
        load_rubric(rubric)


def test_hidden_check_without_code_or_labelled_block_is_refused(tmp_path):
    _, rubric = write_fixture_lab(tmp_path)
    rubric.write_text(rubric.read_text().replace('name = "add_hidden"', 'name = "nowhere"'))
    with pytest.raises(ValueError, match="BEGIN HIDDEN TESTS nowhere"):
        load_rubric(rubric)


def test_the_release_has_no_papermill_cell_so_reports_count_cells_as_students_do(tmp_path):
    solution, _ = write_fixture_lab(tmp_path / "lab")
    nb = nbformat.read(solution, as_version=4)
    injected = new_code_cell('# Parameters\nPROFILE = "ci"')
    injected.metadata["tags"] = ["injected-parameters"]           # a committed papermill run
    nb.cells.insert(2, injected)
    nbformat.write(nb, solution)
    [student] = make_student_notebooks(tmp_path / "lab", tmp_path / "rel", pattern="99_*.ipynb")
    cells = nbformat.read(student, as_version=4).cells
    assert [c.source for c in cells if c.cell_type == "code"][1] == "import labkit\n" \
        "from labkit.config import resolve_profile\nPROFILE = resolve_profile(PROFILE)\n" \
        'labkit.record("profile_ok", PROFILE in ("ci", "full"))'
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in cells)


RUBRICS = sorted(RUBRIC_DIR.glob("lab*.toml"))


@pytest.mark.parametrize("path", RUBRICS, ids=[p.name for p in RUBRICS])
def test_repository_rubric_refers_to_real_record_cells(path: Path):
    rubric = load_rubric(path)
    trusted = "\n".join(record_cells(rubric))
    for check in rubric.checks:
        if check.kind == "record":
            assert f'"{check.record}"' in trusted, f"{path.name}: no record cell of {check.record}"
        elif check.after:
            nb = nbformat.read(rubric.notebook, as_version=4)
            assert any(check.after in c.source for c in nb.cells), f"{check.name}: anchor missing"


@pytest.mark.parametrize("path", RUBRICS, ids=[p.name for p in RUBRICS])
def test_repository_hidden_checks_pass_the_solution_and_fail_the_stub(path: Path):
    from labkit.course.assign import stub_solutions

    rubric = load_rubric(path)
    nb = nbformat.read(rubric.notebook, as_version=4)
    for check in (c for c in rubric.checks if c.kind == "hidden"):
        cell = next(c for c in nb.cells if c.cell_type == "code" and check.after in c.source)
        for source, should_pass in ((cell.source, True), (stub_solutions(cell.source), False)):
            ns: dict = {}
            if "torch" in source:
                import torch

                ns["torch"] = torch
            exec(source, ns)
            try:
                exec(check.code, dict(ns))
                passed = True
            except Exception:
                passed = False
            which = "solution" if should_pass else "stub"
            assert passed == should_pass, f"{check.name} on the {which}"


@pytest.mark.parametrize("path", RUBRICS, ids=[p.name for p in RUBRICS])
def test_repository_trusted_checks_name_only_what_the_trusted_interpreter_has(path: Path):
    """Hidden tests and recomputations run outside the notebook: every name they read must come
    from the lab's parameters, the rubric's setup, the graded definitions, ``records``, the
    builtins or the check's own code (notebook state must be rebuilt by ``setup``)."""
    import builtins

    from labkit.course.assign import student_notebook
    from labkit.course.trusted import graded_names, names, parameters_source

    rubric = load_rubric(path)
    solution = nbformat.read(rubric.notebook, as_version=4)
    available = set(dir(builtins)) | {"records"} | set(graded_names(solution))
    available |= names(parameters_source(student_notebook(solution)))[1]
    available |= names(rubric.setup)[1]
    for check in rubric.checks:
        code, mode = (check.code, "exec") if check.kind == "hidden" else (check.recompute, "eval")
        if code:
            reads, _ = names(code, mode)
            assert reads - available == set(), f"{path.name} {check.name}"


def _feedback(student: str) -> str:
    return (GRADED["tmp"] / "feedback" / student / "fixture.md").read_text()


@pytest.mark.slow
def test_each_student_gets_feedback_without_the_hidden_checks_code(graded):
    from labkit.course.feedback import leaks

    for key in graded.index:
        student = graded.loc[key, "student"]
        text = _feedback(student)
        assert f"# fixture feedback: {student}" in text
        assert leaks(text, GRADED["rubric"]) == [], student
        if graded.loc[key, "status"] != "flagged":
            copy = (GRADED["tmp"] / "feedback" / student / key).read_text()
            assert leaks(copy, GRADED["rubric"]) == [] and "injected-parameters" not in copy
    assert "### BEGIN HIDDEN" not in (GRADED["tmp"] / "grades_executed/solution.ipynb").read_text()


@pytest.mark.slow
def test_feedback_shows_the_input_a_failed_check_tried_and_the_students_cell_numbers(graded):
    slow = _feedback("slow_hidden")
    assert "**add_hidden** (0 of 2)" in slow and "Input: `add(-1, 1)`" in slow
    raises = _feedback("raises")
    assert "RuntimeError in cell 7: my bug" in raises and "cell 7, line 1" in raises
    assert "Cell In[" not in raises
    forged = _feedback("forged")
    assert "got -1, expected 7" in forged and "ignored 1 record(s)" in forged
    assert "| add_n_4 | 0 | 3 | failed |" in forged


@pytest.mark.slow
def test_a_shell_line_is_a_warning_in_the_feedback_not_a_zero(graded):
    row = graded.loc["shell.ipynb"]
    assert (row.status, row.total) == ("ok", 8)
    assert "scan warning: cell 4 line 1: runs a shell command" in row.feedback
    assert "## Warnings (not scored)" in _feedback("shell")


@pytest.mark.slow
def test_the_deadline_marks_late_files_by_their_time(graded):
    late = graded.late.astype(str).eq("True")
    assert not late["solution.ipynb"] and late.drop("solution.ipynb").all()
    assert "(**late**" in _feedback("student") and "late" not in _feedback("solution")


@pytest.mark.slow
def test_the_gradebook_regrades_only_changed_work_and_applies_overrides(graded, capsys):
    """A second ``labkit grade`` on the same folder: unchanged submissions come from the
    gradebook (not run again), an edited one and an allowed flagged one run; an override is
    applied last and shown; ``labkit gradebook`` exports Canvas's import CSV."""
    import csv as csv_module

    from labkit.cli import main

    tmp, subs = GRADED["tmp"], GRADED["subs"]
    before = {r["student"]: r for r in csv_module.DictReader(open(tmp / "book.csv"))}
    nb = nbformat.read(subs / "commented.ipynb", as_version=4)
    nb.cells[0].source += "\nEdited after the first grading."
    nbformat.write(nb, subs / "commented.ipynb")
    (tmp / "overrides.csv").write_text("student,lab,points,reason\n"
                                       "student,fixture,5,partial credit after a meeting\n")
    rubric = tmp / "lab" / "lab99.toml"
    assert main(["grade", str(subs), "--lab", "99", "--rubric", str(rubric), "--out",
                 str(tmp / "again.csv"), "--gradebook", str(tmp / "book.csv"), "--feedback",
                 str(tmp / "feedback"), "--overrides", str(tmp / "overrides.csv"),
                 "--allow-flagged", "tampered", "--notebook-timeout", "8"]) == 0
    after = {r["student"]: r for r in csv_module.DictReader(open(tmp / "book.csv"))}
    rerun = {s for s in after if after[s]["graded_at"] != before[s]["graded_at"]
             or after[s]["sha256"] != before[s]["sha256"]}
    assert {"commented", "tampered"} <= rerun and not rerun & {"solution", "loops", "student"}
    assert after["tampered"]["status"] != "flagged"
    tampered = _feedback("tampered")  # its patched record says 7; its add() gives -1
    assert "the grader's recomputation from your code gives -1" in tampered
    assert "Input: `add(3, 4)`" in tampered and "add(N, 4) gives" not in tampered
    assert (after["student"]["total"], after["student"]["auto_total"]) == ("5.0", "1.0")
    assert "partial credit after a meeting" in _feedback("student")
    assert after["solution"]["total"] == before["solution"]["total"] == "8.0"

    assert main(["gradebook", str(tmp / "book.csv"), "--canvas", str(tmp / "canvas.csv")]) == 0
    rows = list(csv_module.reader(open(tmp / "canvas.csv")))
    assert rows[0] == ["Student", "ID", "SIS User ID", "SIS Login ID", "Section", "fixture"]
    assert ["student", "", "student", "", "", "5.0"] in rows
    assert "solution\t8.0" in capsys.readouterr().out
