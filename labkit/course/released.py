"""What the grader knows of a lab as released: its students' code cells, record cells, graded
names, and which of a submission's cells are the student's own (what the scan reads).

The solution notebook named by the rubric is the single source: ``labkit.course.assign`` makes
the student version from it, read once per file version. A cell whose code is the released
notebook's (up to comments, quotes and layout: ``labkit.course.scoring.normalized``) is the lab's
own; every other code cell is the student's and is scanned (``labkit.course.tamper``).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from labkit.course.rubric import Rubric
from labkit.course.scoring import normalized


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


def released_lab(rubric: Rubric) -> tuple[tuple[str, ...], str, tuple[str, ...]]:
    """``(code cells students receive, the parameters cell, graded names)`` of a rubric's lab."""
    return _released(str(rubric.notebook), Path(rubric.notebook).stat().st_mtime_ns)


def record_cells(rubric: Rubric) -> list[str]:
    """Sources of the lab's record cells, as students receive them."""
    return [src for src in released_lab(rubric)[0] if re.search(r"\brecord\(", src)]


def trusted_sources(rubric: Rubric) -> set[str]:
    """The record cells, normalized (``normalized``): only cells with one of these codes record."""
    return {normalized(src) for src in record_cells(rubric)}


def given_sources(rubric: Rubric) -> set[str]:
    """Every code cell of the notebook students receive (normalized): the lab's own code."""
    return {normalized(src) for src in released_lab(rubric)[0]}


def findings(nb, given: set[str]) -> list[str]:
    """``labkit.course.tamper.scan`` findings in the code cells the student wrote or changed
    (cells in ``given``, the distributed notebook's, are the lab's own code), as
    ``cell N line M: ...``."""
    from labkit.course.tamper import scan

    return [f"cell {i} {finding}" for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and normalized(c.source) not in given
            for finding in scan(c.source)]


def tampering(nb, given: set[str]) -> list[str]:
    """The findings that flag a submission (not run, zero points): those the sandbox does not
    make harmless (``labkit.course.tamper.sandboxed``)."""
    from labkit.course.tamper import sandboxed

    return [f for f in findings(nb, given) if not sandboxed(f)]


def warnings(nb, given: set[str]) -> list[str]:
    """The findings the sandbox makes harmless: reported in the feedback, not scored."""
    from labkit.course.tamper import sandboxed

    return [f for f in findings(nb, given) if sandboxed(f)]
