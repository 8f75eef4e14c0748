"""Student notebooks from solution notebooks: the solution notebook is the single source.

``labkit assign`` writes a release a student can use on their own machine
(``labkit.course.release.make_release``; ``--out`` defaults to ``release`` in the current
folder, the sources to the repository's ``notebooks/`` and ``data/`` wherever labkit runs from)::

    release/
      README.md                 install, each lab's time, graded and record cells, what to hand in
      00_setup.ipynb ...        one student notebook per lab (NN_name.ipynb): solutions stubbed,
                                hidden tests and quiz answers removed, outputs cleared
      data/                     the files the labs read: data/*.txt, *.jsonl, *.json, *.csv and
                                SOURCES.md (never data/rubrics/)
      labkit-<version>-py3-none-any.whl   the package to install (unless --no-wheel)
    release.zip                 the same files under release/ (unless --no-zip)

Never in a release: a rubric, a hidden check, a solution, a quiz answer or the answer key
(``--answer-key FILE`` writes that outside the release folder only).

In a solution notebook:
- ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` wraps what the student writes; the student version
  replaces the whole block (markers included) with ``raise NotImplementedError("Exercise: ...")``
  at the indentation of the ``BEGIN`` marker.
- ``### BEGIN HIDDEN TESTS [check-name]`` ... ``### END HIDDEN TESTS`` wraps tests only the grader
  runs; the student version drops the block (markers included), and a cell left empty is dropped.
  The optional name after the marker lets a rubric's hidden check reuse the block.
- ``name = <answer>  ### ANSWER`` is a knowledge check's answer (``labkit.quiz``); the student
  version has ``name = None  # your answer`` there. Keys and explanations stay in the rubric.
Outputs and execution counts are cleared; the ``parameters`` cell and everything else is kept,
but for papermill's ``injected-parameters`` cell of a committed run (papermill adds its own when
the notebook runs, and a cell the student never saw would shift the cell numbers of every
report).
"""

from __future__ import annotations

import re
from pathlib import Path

from labkit.config import LAB_NOTEBOOKS, NOTEBOOKS_DIR
from labkit.course.runner import INJECTED_TAG

SOURCE_DIR = NOTEBOOKS_DIR  # the solution notebooks (the repository's, from any folder)
RELEASE_DIR = "release"  # the student release (relative to the current folder)
BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
ANSWER = "### ANSWER"
_ANSWER_LINE = re.compile(r"^(\s*)([A-Za-z_]\w*)\s*=.*###\s*ANSWER\s*$")
_DEF = re.compile(r"^(\s*)(?:async\s+)?def\s+(\w+)\s*\(")


def _blocks(source: str, begin: str, end: str, where: str) -> list[tuple[int, int]]:
    """(start, stop) line indices of each marker pair, stop inclusive; ValueError if unbalanced."""
    lines, spans, start = source.splitlines(), [], None
    for i, line in enumerate(lines):
        text = line.strip()
        if text.startswith(begin):
            if start is not None:
                raise ValueError(f"{where}: {begin!r} on line {i + 1} inside an open block "
                                 f"(opened on line {start + 1}); close it with {end!r} first")
            start = i
        elif text.startswith(end):
            if start is None:
                raise ValueError(f"{where}: {end!r} on line {i + 1} without {begin!r}")
            spans.append((start, i))
            start = None
    if start is not None:
        raise ValueError(f"{where}: {begin!r} on line {start + 1} is never closed by {end!r}")
    return spans


def solution_lines(source: str, where: str = "cell") -> list[str]:
    """The lines strictly between solution markers and the answer lines (what the student
    version must not contain)."""
    lines = source.splitlines()
    return [lines[j] for a, b in _blocks(source, BEGIN_SOLUTION, END_SOLUTION, where)
            for j in range(a + 1, b)] + [line for line in lines if ANSWER in line]


def stub_answers(source: str, where: str = "cell") -> str:
    """``source`` with each ``name = <answer>  ### ANSWER`` line as ``name = None``."""
    out = []
    for i, line in enumerate(source.splitlines()):
        if ANSWER in line:
            m = _ANSWER_LINE.match(line)
            if m is None:
                raise ValueError(f"{where} line {i + 1}: {ANSWER!r} marks an assignment "
                                 f"'name = answer  {ANSWER}', got {line.strip()!r}")
            line = f"{m.group(1)}{m.group(2)} = None  # your answer"
        out.append(line)
    return "\n".join(out)


def hidden_blocks(source: str, where: str = "cell") -> list[tuple[str, str]]:
    """``(name, code)`` of each hidden-test block; ``name`` is the text after the marker or ''."""
    lines = source.splitlines()
    out = []
    for a, b in _blocks(source, BEGIN_HIDDEN, END_HIDDEN, where):
        name = lines[a].strip()[len(BEGIN_HIDDEN):].strip()
        out.append((name, "\n".join(lines[a + 1:b])))
    return out


def stub_solutions(source: str, where: str = "cell") -> str:
    """``source`` with each solution block replaced by an indented NotImplementedError stub."""
    lines = source.splitlines()
    spans = _blocks(source, BEGIN_SOLUTION, END_SOLUTION, where)
    for a, b in reversed(spans):
        indent = lines[a][: len(lines[a]) - len(lines[a].lstrip())]
        func = next((m.group(2) for line in reversed(lines[:a])
                     if (m := _DEF.match(line)) and len(m.group(1)) < len(indent)), None)
        what = f"implement {func}()" if func else "write your code here"
        lines[a:b + 1] = [f'{indent}raise NotImplementedError("Exercise: {what}")']
    return "\n".join(lines)


def strip_hidden_tests(source: str, where: str = "cell") -> str:
    """``source`` without its hidden-test blocks (markers and everything between them)."""
    lines = source.splitlines()
    for a, b in reversed(_blocks(source, BEGIN_HIDDEN, END_HIDDEN, where)):
        del lines[a:b + 1]
    return "\n".join(lines).strip("\n")


def student_notebook(nb):
    """A student copy of solution notebook ``nb`` (an nbformat v4 NotebookNode; not modified)."""
    import copy

    out = copy.deepcopy(nb)
    cells = []
    for i, cell in enumerate(out.cells):
        where = f"cell {i}"
        if INJECTED_TAG in cell.metadata.get("tags", []):
            continue
        if cell.cell_type == "code":
            had_hidden = BEGIN_HIDDEN in cell.source
            cell.source = stub_answers(
                stub_solutions(strip_hidden_tests(cell.source, where), where), where)
            if had_hidden and not cell.source.strip():
                continue
            cell.outputs = []
            cell.execution_count = None
        elif any(m in cell.source for m in (BEGIN_SOLUTION, END_SOLUTION, BEGIN_HIDDEN, ANSWER)):
            raise ValueError(f"{where} is {cell.cell_type}, and solution or hidden-test markers "
                             "work in code cells only: move the answer into a code cell")
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        cells.append(cell)
    out.cells = cells
    out.metadata.pop("papermill", None)
    out.metadata.pop("widgets", None)  # widget state of the solution run (progress bars, ...)
    return out


def make_student_notebooks(src_dir: str | Path = SOURCE_DIR, out_dir: str | Path = RELEASE_DIR,
                           pattern: str = LAB_NOTEBOOKS) -> list[Path]:
    """Write a student version of every solution notebook in ``src_dir`` to ``out_dir``.

    Returns the written paths, sorted. Raises ValueError naming notebook and cell for unbalanced
    markers, FileNotFoundError if ``src_dir`` holds no notebook matching ``pattern``.
    """
    import nbformat

    sources = sorted(Path(src_dir).glob(pattern))
    if not sources:
        raise FileNotFoundError(f"no notebooks matching {pattern!r} in {str(src_dir)!r} (the "
                                f"solution notebooks of the course repository: pass --src DIR)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for src in sources:
        nb = nbformat.read(src, as_version=4)
        try:
            student = student_notebook(nb)
        except ValueError as exc:
            raise ValueError(f"{src}: {exc}") from None
        target = out / src.name
        nbformat.write(student, target)
        written.append(target)
    return written
