"""Grading a class: submissions found by student in flat or nbgrader folders, a deadline, the
overrides file, Canvas's import CSV, workers side by side (one per GPU), feedback that names the
student's own cells and never the rubric's code; and, end to end, lab 00 released from outside
the repository, a solved and an untouched submission graded side by side."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from labkit.config import NOTEBOOKS_DIR
from labkit.course.feedback import leaks, renumber_traceback, student_copy
from labkit.course.gradebook import export_canvas, read_overrides
from labkit.course.rubric import load_rubric
from labkit.course.sandbox import unavailable
from labkit.course.submissions import find_submissions, is_late, parse_time
from labkit.course.workers import side_by_side


def _nb(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(new_notebook(cells=[new_code_cell("x = 1")]), path)
    return path


def test_students_come_from_file_names_or_nbgrader_folders(tmp_path):
    _nb(tmp_path / "ann.ipynb")
    _nb(tmp_path / "bob" / "00_setup.ipynb")
    _nb(tmp_path / "bob" / "01_profiling.ipynb")                 # another lab: not this one's
    _nb(tmp_path / "cy" / "lab00" / "00_setup.ipynb")            # submitted/<student>/<lab>/
    (tmp_path / "cy" / "lab00" / "timestamp.txt").write_text("2026-11-30 09:00:00 UTC")
    subs = {s.student: s for s in find_submissions(tmp_path, "00_setup.ipynb")}
    assert sorted(subs) == ["ann", "bob", "cy"]
    assert subs["bob"].key == "bob/00_setup.ipynb" and len(subs["bob"].sha256) == 64
    assert subs["cy"].submitted_at == datetime(2026, 11, 30, 9, tzinfo=UTC)
    assert subs["cy"].time_source == "timestamp.txt" and subs["ann"].time_source == "file mtime"
    deadline = parse_time("2026-11-30T10:00")
    assert not is_late(subs["cy"], deadline) and is_late(subs["ann"], deadline)


def test_two_notebooks_for_one_lab_or_one_id_twice_are_refused_by_name(tmp_path):
    _nb(tmp_path / "bob" / "00_setup_v1.ipynb")  # no 00_setup.ipynb: which one is it?
    _nb(tmp_path / "bob" / "00_setup_v2.ipynb")
    with pytest.raises(ValueError, match="student 'bob' has 2 notebooks for this lab"):
        find_submissions(tmp_path, "00_setup.ipynb")
    shutil.rmtree(tmp_path / "bob")
    _nb(tmp_path / "bob.ipynb")
    _nb(tmp_path / "bob" / "00_setup.ipynb")
    with pytest.raises(ValueError, match="student id 'bob' is used twice"):
        find_submissions(tmp_path, "00_setup.ipynb")


def test_a_bad_deadline_and_a_bad_override_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="bad deadline 'friday'"):
        parse_time("friday", "deadline")
    bad = tmp_path / "o.csv"
    bad.write_text("student,lab,points,reason\nann,0,lots,kind\n")
    with pytest.raises(ValueError, match=r"o.csv row 2: points 'lots' is not a number >= 0"):
        read_overrides(bad)
    bad.write_text("student,points\nann,3\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['lab', 'reason'\]"):
        read_overrides(bad)
    bad.write_text("student,lab,points,reason\nann,lab00,3,late start\n")
    assert read_overrides(bad) == {("ann", "lab00"): (3.0, "late start")}


def test_canvas_export_has_one_row_per_student_and_a_column_per_lab(tmp_path):
    book = [{"student": "ann", "lab": "lab00", "total": "8.0"},
            {"student": "ann", "lab": "lab01", "total": "3.0"},
            {"student": "bob", "lab": "lab00", "total": "5.0"}]
    lines = export_canvas(book, tmp_path / "canvas.csv").read_text().splitlines()
    assert lines == ["Student,ID,SIS User ID,SIS Login ID,Section,lab00,lab01",
                     "ann,,ann,,,8.0,3.0", "bob,,bob,,,5.0,"]


def test_one_submission_per_gpu_at_a_time_each_seeing_only_its_card():
    busy: dict[str, int] = {}
    lock, seen = threading.Lock(), []

    def work(item: int, env: dict) -> tuple[int, str]:
        gpu = env["CUDA_VISIBLE_DEVICES"]
        with lock:
            busy[gpu] = busy.get(gpu, 0) + 1
            seen.append(busy[gpu])
        time.sleep(0.02)
        with lock:
            busy[gpu] -= 1
        return item, gpu

    out = side_by_side(work, list(range(8)), jobs=5, gpus=["0", "1"])
    assert [i for i, _ in out] == list(range(8)) and {g for _, g in out} == {"0", "1"}
    assert max(seen) == 1  # never two submissions on one GPU
    assert side_by_side(lambda i, env: (i, env), [1, 2], jobs=1) == [(1, {}), (2, {})]


def test_tracebacks_use_the_students_cell_numbers_and_the_copy_drops_papermills_cell():
    injected = new_code_cell("# Parameters\nPROFILE = 'ci'", execution_count=2)
    injected.metadata["tags"] = ["injected-parameters"]
    hidden = "x = 1\n### BEGIN HIDDEN TESTS t\nassert f(2) == 4\n### END HIDDEN TESTS"
    nb = new_notebook(cells=[new_code_cell("PROFILE = 'auto'", execution_count=1), injected,
                             new_code_cell(hidden, execution_count=3),
                             new_code_cell("1 / 0", execution_count=4)])
    text = "\x1b[31mZeroDivisionError\x1b[0m Traceback\nCell In[4], line 1\n----> 1 1 / 0"
    assert renumber_traceback(text, nb) == "ZeroDivisionError Traceback\ncell 2, line 1\n" \
        "----> 1 1 / 0"
    copy = student_copy(nb)
    assert [c.source for c in copy.cells] == ["PROFILE = 'auto'", "x = 1", "1 / 0"]


def test_the_leak_check_finds_a_rubric_line_in_a_text():
    rubric = load_rubric(0)
    [hidden] = [c for c in rubric.checks if c.kind == "hidden"]
    line = hidden.code.strip().splitlines()[1]
    assert leaks(f"look: {line}", rubric) == [line.strip()]
    assert leaks("tokens_per_second(namespace(token_times_s=[]))", rubric) == []


@pytest.mark.skipif(unavailable() is not None, reason=f"no sandbox here: {unavailable()}")
def test_a_sandboxed_lab_reads_the_repositorys_data_and_no_rubric(tmp_path):
    """Inside the box the repository is still the repository (``pyproject.toml`` is shown), so
    ``labkit.config.DATA_DIR`` is ``data/``, not a wheel's copy that is not there."""
    from labkit.config import DATA_DIR
    from labkit.course.sandbox import Limits, command, make_box, remove_box

    box = make_box(tmp_path, "box")
    code = ("import os; from labkit.config import DATA_DIR, RUBRIC_DIR; "
            "print(DATA_DIR, os.path.isfile(DATA_DIR / 'prompts.jsonl'), os.listdir(RUBRIC_DIR))")
    done = subprocess.run(command(box, [sys.executable, "-c", code], Limits()),
                          capture_output=True, text=True, timeout=60)
    remove_box(box)
    assert done.stdout.split() == [str(DATA_DIR), "True", "[]"], done.stderr


# --------------------------------------------------------------------------- lab 00 end to end
def _solved(student_nb: Path, solution_nb: Path, out: Path) -> None:
    """The released student notebook with each stubbed cell filled from the solution (its
    hidden-test blocks left out, as a student's would be)."""
    from labkit.course.assign import strip_hidden_tests, student_notebook

    filled = {}
    for cell in nbformat.read(solution_nb, as_version=4).cells:
        if cell.cell_type == "code":
            for stub in student_notebook(new_notebook(cells=[cell])).cells:
                filled[stub.source] = strip_hidden_tests(cell.source)
    nb = nbformat.read(student_nb, as_version=4)
    for cell in nb.cells:
        cell.source = filled.get(cell.source, cell.source)
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)


@pytest.mark.slow
@pytest.mark.skipif(unavailable() is not None, reason=f"no sandbox here: {unavailable()}")
def test_lab00_assigned_outside_the_repo_graded_side_by_side_with_feedback_and_gradebook(
        tmp_path):
    labkit = [sys.executable, "-m", "labkit.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    work = tmp_path / "course"
    work.mkdir()
    done = subprocess.run([*labkit, "assign", "--out", "release", "--no-wheel"], cwd=work,
                          env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 and "--no-wheel" in done.stderr:  # an assign without the option
        done = subprocess.run([*labkit, "assign", "--out", "release"], cwd=work, env=env,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    [released] = [p for p in (work / "release").rglob("00_setup.ipynb")]
    subs = work / "submitted"
    _solved(released, NOTEBOOKS_DIR / "00_setup.ipynb", subs / "ada" / "00_setup.ipynb")
    (subs / "bea").mkdir()
    shutil.copy(released, subs / "bea" / "00_setup.ipynb")
    done = subprocess.run([*labkit, "grade", "submitted", "--lab", "0", "-j", "2", "--out",
                           "grades/lab00.csv", "--feedback", "feedback", "--gradebook",
                           "gradebook.csv"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    import pandas as pd

    book = pd.read_csv(work / "gradebook.csv").set_index("student")
    assert sorted(book.index) == ["ada", "bea"] and set(book.lab) == {"lab00"}
    assert book.loc["ada", "total"] == book.loc["ada", "max"], book.loc["ada", "feedback"]
    assert book.loc["bea", "total"] < book.loc["ada", "total"]
    rubric = load_rubric(0)
    for student in ("ada", "bea"):
        text = (work / "feedback" / student / "lab00.md").read_text()
        assert leaks(text, rubric) == [], student
        copy = (work / "feedback" / student / "00_setup.ipynb").read_text()
        assert leaks(copy, rubric) == [] and "injected-parameters" not in copy
    assert "NotImplementedError" in (work / "feedback" / "bea" / "lab00.md").read_text()
