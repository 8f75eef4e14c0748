"""Committed notebooks carry no papermill ``injected-parameters`` cell.

A committed run that kept it would override ``PROFILE = "auto"`` for everyone who opens the lab
(``PROFILE = "ci"`` on a GPU) and shift every cell number a student or a grade report sees.
``labkit run --publish`` and ``labkit assign`` drop it; this test catches a notebook committed
another way: every lab under ``notebooks/`` and every executed notebook under ``results/``.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from labkit.course.publish import injected_cells, strip_injected

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted([*(ROOT / "notebooks").glob("*.ipynb"), *(ROOT / "results").rglob("*.ipynb")])


def test_there_are_committed_notebooks():
    assert any(p.parent.name == "notebooks" for p in COMMITTED), "no notebooks/*.ipynb found"


@pytest.mark.parametrize("path", COMMITTED, ids=[str(p.relative_to(ROOT)) for p in COMMITTED])
def test_committed_notebook_has_no_injected_parameters_cell(path):
    cells = injected_cells(nbformat.read(path, as_version=4))
    assert not cells, (f"{path.relative_to(ROOT)}: cell(s) {cells} tagged injected-parameters; "
                       f"publish runs with `labkit run --publish`, or remove them with "
                       f"labkit.course.publish.strip_injected")


def test_strip_injected_removes_only_that_cell(tmp_path):
    params = new_code_cell('PROFILE = "auto"', metadata={"tags": ["parameters"]})
    injected = new_code_cell('# Parameters\nPROFILE = "ci"\n',
                             metadata={"tags": ["injected-parameters"]})
    ran = new_code_cell("print(1)", execution_count=3,
                        outputs=[new_output("stream", name="stdout", text="1\n")],
                        metadata={"papermill": {"duration": 0.1}})
    nb = new_notebook(cells=[new_markdown_cell("# Lab"), params, injected, ran],
                      metadata={"papermill": {"parameters": {"PROFILE": "ci"}}})
    path = tmp_path / "01_lab.ipynb"
    nbformat.write(nb, path)
    assert injected_cells(nbformat.read(path, as_version=4)) == [2]

    assert strip_injected(path) == 1
    nb.cells.pop(2)
    assert path.read_text() == nbformat.writes(nb) + "\n"  # everything else byte for byte
    before = path.stat().st_mtime_ns
    assert strip_injected(path) == 0 and path.stat().st_mtime_ns == before  # not rewritten
