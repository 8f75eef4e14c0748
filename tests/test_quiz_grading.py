"""Knowledge checks end to end: released without answers, graded from the answer variable, fed
back with the explanation; the answer key is generated from the notebook and the rubric."""

from __future__ import annotations

import shutil

import nbformat
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from labkit.course.answer_key import lab_key, questions_in
from labkit.course.assign import make_student_notebooks
from labkit.course.rubric import load_rubric
from labkit.course.sandbox import unavailable

WHY = "int4 stores 4 bits per weight and one fp16 scale and zero point per group of 32"
TEMPTING = "it forgets the scales and zero points"
RUBRIC = f'''lab = "quiz"
notebook = "98_quiz.ipynb"
timeout_s = 30

[[check]]
name = "ran"
points = 1
kind = "record"
record = "ran"
op = "true"
feedback = "the notebook did not run"

[[quiz]]
name = "q98_int4_bytes"
answer = "C"
points = 2
why = "{WHY}"
wrong = {{ A = "{TEMPTING}", B = "it counts int8" }}

[[quiz]]
name = "q98_ratio"
kind = "number"
answer = 4.0
rel_tol = 0.1
why = "fp16 is 16 bits, int4 is 4"

[closing]
question = "Why does int4 help decode more than prefill?"
model_answer = "decode reads every weight once per token: it is bandwidth-bound"
'''
ASK = ('q98_int4_bytes = "C"  ### ANSWER\n'
       'labkit.ask("q98_int4_bytes", "Bytes per weight of int4 with groups of 32?", '
       '{"A": "0.5", "B": "1.0", "C": "0.5625"})')
ASK_NUMBER = ('q98_ratio = 4  ### ANSWER\n'
              'labkit.ask("q98_ratio", "fp16 bytes over int4 bytes, scales aside?", unit="x")')


def _lab(directory):
    params = new_code_cell('PROFILE = "auto"')
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[
        new_markdown_cell("# Quiz lab\nTwo questions. Time: 1 minute."), params,
        new_code_cell('import labkit\nlabkit.record("ran", True)'),
        new_code_cell(ASK), new_code_cell('labkit.record("q98_int4_bytes", q98_int4_bytes)'),
        new_code_cell(ASK_NUMBER), new_code_cell('labkit.record("q98_ratio", q98_ratio)'),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                "language": "python"}})
    directory.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, directory / "98_quiz.ipynb")
    (directory / "lab98.toml").write_text(RUBRIC)
    return directory / "98_quiz.ipynb", directory / "lab98.toml"


def test_the_release_holds_no_answer_and_no_explanation(tmp_path):
    _lab(tmp_path / "lab")
    [student] = make_student_notebooks(tmp_path / "lab", tmp_path / "rel", pattern="98_*.ipynb")
    text = student.read_text()
    assert "q98_int4_bytes = None  # your answer" in text and "q98_ratio = None" in text
    for secret in ('"C"  ### ANSWER', "ANSWER", WHY, TEMPTING, "it counts int8",
                   "bandwidth-bound"):
        assert secret not in text


def test_the_answer_key_comes_from_the_notebook_and_the_rubric(tmp_path):
    _, rubric = _lab(tmp_path / "lab")
    loaded = load_rubric(rubric)
    assert questions_in(loaded.notebook)["q98_int4_bytes"]["choices"]["C"] == "0.5625"
    key = lab_key(loaded)
    assert "- C) 0.5625 **(answer)**" in key and f"tempting because: {TEMPTING}" in key
    assert "answer: 4 x (accepted within +/- 0.4 x)" in key and "Model answer: decode" in key
    (tmp_path / "lab" / "lab98.toml").write_text(RUBRIC.replace('name = "q98_ratio"',
                                                                'name = "q98_other"'))
    with pytest.raises(ValueError, match=r"asks \['q98_ratio'\] but the lab quiz rubric"):
        lab_key(load_rubric(rubric))


@pytest.mark.slow
@pytest.mark.skipif(unavailable() is not None, reason=f"no sandbox here: {unavailable()}")
def test_right_untouched_and_wrong_answers_are_graded_with_feedback(tmp_path):
    solution, rubric = _lab(tmp_path / "lab")
    [student] = make_student_notebooks(tmp_path / "lab", tmp_path / "rel", pattern="98_*.ipynb")
    subs = tmp_path / "subs"
    subs.mkdir()
    shutil.copy(solution, subs / "solution.ipynb")
    shutil.copy(student, subs / "untouched.ipynb")
    nb = nbformat.read(student, as_version=4)
    for cell in nb.cells:
        cell.source = cell.source.replace("q98_int4_bytes = None", 'q98_int4_bytes = "a"')
        cell.source = cell.source.replace("q98_ratio = None", "q98_ratio = 2")
    nbformat.write(nb, subs / "wrong.ipynb")
    from labkit.course import grading

    csv = tmp_path / "grades.csv"
    grading.grade(subs, "98", csv, rubric=load_rubric(rubric))
    rows = pd.read_csv(csv, keep_default_na=False).set_index("submission")
    assert (rows.loc["solution.ipynb", "total"], rows.loc["solution.ipynb", "max"]) == (4, 4)
    untouched, wrong = rows.loc["untouched.ipynb"], rows.loc["wrong.ipynb"]
    assert (untouched.q98_int4_bytes, untouched.q98_ratio, untouched.total) == (0, 0, 1)
    assert "not answered; the answer is C" in untouched.feedback
    assert (wrong.q98_int4_bytes, wrong.q98_ratio, wrong.total) == (0, 0, 1)
    assert "a is not right; the answer is C" in wrong.feedback and WHY in wrong.feedback
    assert f"Why A is tempting: {TEMPTING}" in wrong.feedback
    assert "2 is not right; the answer is 4.0" in wrong.feedback


QUIZ_LABS = [f"{n:02d}" for n in range(7)]   # labs 00-06: 3 to 5 knowledge checks each (issue 17)


@pytest.mark.parametrize("lab", QUIZ_LABS)
def test_each_lab_keys_three_to_five_checks_its_solution_answers_right(lab):
    """Static half of 'the solution gets full marks, the untouched release zero': every
    ``### ANSWER`` line of the solution notebook is right by the rubric's key, the stub the
    release gets (None) is not, each wrong choice says why it is tempting, and the key builds."""
    import ast
    import re

    from labkit.course.assign import stub_answers
    from labkit.quiz import load_keys

    keys = load_keys(lab)
    assert 3 <= len(keys) <= 5, f"lab {lab}: {len(keys)} knowledge checks"
    rubric = load_rubric(int(lab))
    assert rubric.closing and rubric.closing.get("model_answer"), f"lab {lab}: no closing answer"
    asked = questions_in(rubric.notebook)
    lab_key(rubric)   # questions and keys agree
    answers = {}
    for cell in nbformat.read(rubric.notebook, as_version=4).cells:
        for line in cell.source.splitlines():
            m = re.match(r"^\s*(q\d\d_\w+)\s*=\s*(.*?)\s*###\s*ANSWER\s*$", line)
            if m:
                answers[m.group(1)] = ast.literal_eval(m.group(2))
                stub = stub_answers(line).strip()
                assert stub == f"{m.group(1)} = None  # your answer", stub
    assert set(answers) == set(keys), f"lab {lab}: answered {sorted(answers)}, keyed {sorted(keys)}"
    for name, key in keys.items():
        assert key.is_right(answers[name]) and not key.is_right(None), name
        choices = asked[name]["choices"] or {}
        missing = set(choices) - {key.answer} - set(key.wrong)
        assert not missing, f"{name}: no 'why tempting' for {sorted(missing)}"
