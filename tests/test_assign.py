"""Student notebooks come from the solution notebooks: no solution text, no hidden tests left."""

from __future__ import annotations

import nbformat
import pytest
from fixtures.fixture_lab import HIDDEN, SOLUTION_BODY, write_fixture_lab

from labkit.config import PROJECT_ROOT
from labkit.course.assign import (
    BEGIN_HIDDEN,
    BEGIN_SOLUTION,
    make_student_notebooks,
    solution_lines,
    stub_solutions,
    student_notebook,
)


def _all_text(nb) -> str:
    return "\n".join(c.source for c in nb.cells)


def _student_pairs(src_dir, out_dir, pattern):
    written = make_student_notebooks(src_dir, out_dir, pattern=pattern)
    return [(nbformat.read(src_dir / p.name, as_version=4), nbformat.read(p, as_version=4))
            for p in written]


def test_fixture_student_version_has_no_solution_and_no_hidden_tests(tmp_path):
    write_fixture_lab(tmp_path / "lab")
    [(solution, student)] = _student_pairs(tmp_path / "lab", tmp_path / "out", "99_*.ipynb")
    text = _all_text(student)
    assert SOLUTION_BODY.strip() not in text and "### " not in text
    for line in HIDDEN.splitlines()[1:-1]:
        assert line not in text
    assert len(student.cells) == len(solution.cells) - 1  # the hidden-test cell is dropped
    assert 'raise NotImplementedError("Exercise: implement add()")' in text


def test_student_version_keeps_parameters_and_clears_outputs(tmp_path):
    write_fixture_lab(tmp_path / "lab")
    [(_, student)] = _student_pairs(tmp_path / "lab", tmp_path / "out", "99_*.ipynb")
    params = [c for c in student.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "N = 3" in params[0].source
    code = [c for c in student.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)


def test_repository_notebooks_release_without_solution_lines(tmp_path):
    src = PROJECT_ROOT / "notebooks"
    pairs = _student_pairs(src, tmp_path, "[0-9][0-9]_*.ipynb")
    assert pairs, "no lab notebooks to release"
    for solution, student in pairs:
        text = _all_text(student)
        assert BEGIN_SOLUTION not in text and BEGIN_HIDDEN not in text
        for i, cell in enumerate(solution.cells):
            for line in solution_lines(cell.source, f"cell {i}"):
                if line.strip():
                    assert line not in text, f"solution line left in the student version: {line!r}"
        assert not any(c.get("outputs") for c in student.cells)


def test_stub_keeps_the_indentation_of_the_block():
    src = ("class A:\n    def f(self):\n        x = 1\n        ### BEGIN SOLUTION\n"
           "        return x + 1\n        ### END SOLUTION\n")
    assert stub_solutions(src) == ("class A:\n    def f(self):\n        x = 1\n"
                                   '        raise NotImplementedError("Exercise: implement f()")')


@pytest.mark.parametrize("source, message", [
    ("### BEGIN SOLUTION\nx = 1\n", "never closed"),
    ("x = 1\n### END SOLUTION\n", "without '### BEGIN SOLUTION'"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside an open block"),
])
def test_unbalanced_markers_name_the_cell_and_line(source, message):
    with pytest.raises(ValueError, match=message) as err:
        stub_solutions(source, "cell 4")
    assert str(err.value).startswith("cell 4: ")


def test_markers_outside_code_cells_are_refused_and_widget_state_is_dropped():
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell("x = 1")],
                      metadata={"widgets": {"application/vnd.jupyter.widget-state+json": {}}})
    assert "widgets" not in student_notebook(nb).metadata
    nb.cells.append(new_markdown_cell("Answer:\n### BEGIN SOLUTION\nit is 42\n### END SOLUTION"))
    with pytest.raises(ValueError, match="cell 1 is markdown, and solution or hidden-test markers"):
        student_notebook(nb)
