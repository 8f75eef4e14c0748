"""``labkit.quiz``: answers in a variable, keys from the rubric, feedback that teaches."""

from __future__ import annotations

import pytest

from labkit.quiz import Key, ask, load_keys, predict, reveal

RUBRIC = '''lab = 4
notebook = "04_quantization.ipynb"

[[quiz]]
name = "q04_int4_bytes"
answer = "B"
points = 2
why = "4 bits per weight plus one fp16 scale and zero point per group of 32."
wrong = { A = "forgets the scales", C = "counts int8" }

[[quiz]]
name = "q04_speedup"
kind = "number"
answer = 2.0
rel_tol = 0.25
why = "half the bytes read per token."
'''


@pytest.fixture
def keys(tmp_path):
    (tmp_path / "lab04.toml").write_text(RUBRIC)
    return load_keys(4, tmp_path)


def test_keys_load_with_kinds_points_and_tolerances(keys):
    assert set(keys) == {"q04_int4_bytes", "q04_speedup"}
    assert keys["q04_int4_bytes"].points == 2 and keys["q04_int4_bytes"].kind == "choice"
    assert keys["q04_speedup"].kind == "number" and keys["q04_speedup"].rel_tol == 0.25


def test_right_and_wrong_answers_and_their_feedback(keys):
    choice, number = keys["q04_int4_bytes"], keys["q04_speedup"]
    assert choice.is_right("b") and not choice.is_right("A") and not choice.is_right(None)
    assert number.is_right(2.4) and not number.is_right(2.6) and not number.is_right("fast")
    wrong = choice.feedback("A")
    assert "the answer is B" in wrong and "forgets the scales" in wrong and "group of 32" in wrong
    assert choice.feedback("B").startswith("right (B)")
    assert "not answered" in choice.feedback(None)


def test_bad_keys_are_one_line_errors_naming_the_question(tmp_path):
    (tmp_path / "lab04.toml").write_text('lab = 4\n[[quiz]]\nname = "q04_x"\nkind = "essay"\n'
                                         'answer = "A"\nwhy = "."\n')
    with pytest.raises(ValueError, match=r"lab04.toml quiz 0 \(q04_x\): unknown kind 'essay'"):
        load_keys(4, tmp_path)
    (tmp_path / "lab04.toml").write_text('lab = 4\n[[quiz]]\nname = "q04_x"\nanswer = "A"\n')
    with pytest.raises(ValueError, match="missing 'why'"):
        load_keys(4, tmp_path)


def test_ask_outside_a_kernel_prints_question_choices_and_how_to_answer(capsys):
    ask("q04_int4_bytes", "How many bytes?", {"A": "0.5 per weight", "B": "0.5625 per weight"})
    out = capsys.readouterr().out
    assert "Knowledge check q04_int4_bytes: How many bytes?" in out
    assert "  B) 0.5625 per weight" in out and 'set q04_int4_bytes = "A/B"' in out
    with pytest.raises(ValueError, match="q04_topic or p02_topic"):
        ask("int4_bytes", "?", None)


def test_predict_then_reveal(capsys):
    predict("p02_speedup", 4.0)
    assert "prediction noted (4.0)" in capsys.readouterr().out
    shown = reveal("p02_speedup", 4.0, 5.0, unit="x")
    assert shown["ratio"] == pytest.approx(1.25)
    assert "predicted 4.0 x, measured 5 x (measured / predicted = 1.25)" in capsys.readouterr().out
    assert reveal("p02_speedup", None, 5.0)["ratio"] is None


def test_key_of_a_number_question_compares_numbers_not_strings():
    key = Key("q01_x", "number", 1e6, "why", abs_tol=1.0)
    assert key.is_right("1000000.5") and not key.is_right("1e7")
