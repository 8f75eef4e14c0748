"""Publishing a run: outputs kept, papermill's injected cell and metadata dropped, code checked."""

from __future__ import annotations

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from labkit.course.publish import publish, without_run_artifacts


def _source(path):
    params = new_code_cell('PROFILE = "auto"')
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[new_markdown_cell("# Lab"), params, new_code_cell("print(1)")])
    nbformat.write(nb, path)
    return nb


def _executed(nb, path, extra_code=None):
    run = nbformat.from_dict(nb)
    injected = new_code_cell('# Parameters\nPROFILE = "ci"\n')
    injected.metadata["tags"] = ["injected-parameters"]
    run.cells.insert(2, injected)
    run.cells[-1].outputs = [new_output("stream", name="stdout", text="1\n")]
    run.cells[-1].execution_count = 3
    run.cells[-1].metadata["papermill"] = {"duration": 0.1}
    run.metadata["papermill"] = {"parameters": {"PROFILE": "ci"}}
    if extra_code:
        run.cells.append(new_code_cell(extra_code))
    nbformat.write(run, path)


def test_publish_keeps_outputs_and_drops_the_injected_cell(tmp_path):
    nb = _source(tmp_path / "01_lab.ipynb")
    _executed(nb, tmp_path / "run.ipynb")
    publish(tmp_path / "run.ipynb", tmp_path / "01_lab.ipynb")
    out = nbformat.read(tmp_path / "01_lab.ipynb", as_version=4)
    assert [c.source for c in out.cells] == [c.source for c in nb.cells]
    assert out.cells[-1].outputs[0]["text"] == "1\n" and out.cells[-1].execution_count == 3
    assert "papermill" not in out.metadata and "papermill" not in out.cells[-1].metadata


def test_publish_refuses_other_code_and_failed_runs(tmp_path):
    nb = _source(tmp_path / "01_lab.ipynb")
    _executed(nb, tmp_path / "run.ipynb", extra_code="print(2)")
    with pytest.raises(ValueError, match="its code differs"):
        publish(tmp_path / "run.ipynb", tmp_path / "01_lab.ipynb")
    run = nbformat.read(tmp_path / "run.ipynb", as_version=4)
    banner = new_markdown_cell("An Exception was encountered")
    banner.metadata["tags"] = ["papermill-error-cell-tag"]
    run.cells.insert(0, banner)
    nbformat.write(run, tmp_path / "failed.ipynb")
    with pytest.raises(ValueError, match="the run failed"):
        publish(tmp_path / "failed.ipynb", tmp_path / "01_lab.ipynb")
    assert without_run_artifacts(run).cells[0].source == "# Lab"
