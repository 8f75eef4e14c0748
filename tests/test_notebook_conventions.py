"""Every lab notebook keeps the kit's conventions (DESIGN.md, "What a lab notebook is").

These checks read the committed ``notebooks/NN_*.ipynb`` files; they run nothing, so they are fast.
Each notebook is its own test id, so a failure names the notebook and the broken convention.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
# labkit.record(...), or record(...) after importing it by name
RECORD_CALL = re.compile(r"\blabkit\.record\(")
RECORD_IMPORT = re.compile(r"from\s+labkit\s+import\s+[^\n]*\brecord\b")


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def _code_cells(nb: nbformat.NotebookNode) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.fixture(params=NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def notebook(request) -> tuple[str, nbformat.NotebookNode]:
    return request.param.name, _read(request.param)


def test_there_are_lab_notebooks():
    assert NOTEBOOKS, "no notebooks/NN_*.ipynb found"


def test_notebook_is_valid_nbformat(notebook):
    name, nb = notebook
    nbformat.validate(nb)  # raises ValidationError naming the bad field


def test_first_cell_is_a_markdown_title(notebook):
    name, nb = notebook
    first = nb.cells[0]
    assert first.cell_type == "markdown", f"{name}: cell 0 is {first.cell_type}, not markdown"
    assert first.source.startswith("# "), f"{name}: cell 0 must start with '# Title'"


def test_one_parameters_cell_near_the_top(notebook):
    name, nb = notebook
    tagged = [i for i, c in enumerate(nb.cells)
              if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: code cells tagged 'parameters' at {tagged}; need exactly 1"
    assert tagged[0] < 3, f"{name}: the 'parameters' cell is cell {tagged[0]}; it must be in 0-2"


def test_committed_with_outputs_and_no_errors(notebook):
    name, nb = notebook
    code = _code_cells(nb)
    assert any(c.get("outputs") for c in code), f"{name}: no outputs; run it with papermill"
    errors = [(i, o.get("ename")) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{name}: stored error outputs (cell, exception): {errors}"


def test_has_a_checked_deterministic_cell(notebook):
    name, nb = notebook
    checked = [c for c in _code_cells(nb) if c.source.lstrip().startswith("# NBVAL_CHECK_OUTPUT")]
    assert checked, f"{name}: no code cell starts with '# NBVAL_CHECK_OUTPUT'"


def test_solution_markers_are_paired(notebook):
    name, nb = notebook
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        lines = [line.strip() for line in cell.source.splitlines()]
        depth = 0
        for line in lines:
            if line == BEGIN:
                assert depth == 0, f"{name} cell {i}: '{BEGIN}' inside an open solution block"
                depth = 1
            elif line == END:
                assert depth == 1, f"{name} cell {i}: '{END}' without a '{BEGIN}' before it"
                depth = 0
        assert depth == 0, f"{name} cell {i}: '{BEGIN}' without a matching '{END}'"


def test_records_a_result_for_grading(notebook):
    name, nb = notebook
    source = "\n".join(c.source for c in _code_cells(nb))
    imported = RECORD_IMPORT.search(source) and re.search(r"(?<![.\w])record\(", source)
    assert RECORD_CALL.search(source) or imported, \
        f"{name}: no cell calls labkit.record(name, value)"
