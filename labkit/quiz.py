"""Knowledge checks and predict-then-measure questions, answered in a variable and graded.

A knowledge check is two cells. The first holds the answer as a plain variable, so a student can
type it, a widget can set it and a grader can read it::

    q04_int4_bytes = None   # your answer: "A", "B", "C" or "D"
    labkit.ask("q04_int4_bytes", "How many bytes does ...?", {"A": "...", "B": "...", ...})

The second is the lab's record cell (``labkit.record("q04_int4_bytes", q04_int4_bytes)``), which
the grader reads. ``ask`` shows the question with radio buttons and a Submit button in
JupyterLab (Submit sets the variable in the kernel) and as text elsewhere (papermill, nbval).
Numeric questions (``choices=None``) take a number.

The right answers and their explanations are not in the notebook: they live in the lab's rubric
(``[[quiz]]`` tables in ``data/rubrics/labNN.toml``, see its README), which ``labkit assign``
does not ship. Where the rubric is present (an instructor's checkout) Submit shows the feedback at
once; in a student release it says the answer is recorded and the feedback comes with grading.

A prediction is recorded *before* the measurement it predicts (``predict``), then shown beside
the measured value (``reveal``); it is graded on having been made, not on being right.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from labkit.config import RUBRIC_DIR

KINDS = ("choice", "number")


@dataclass(frozen=True)
class Key:
    """The answer key of one question: the right choice (or value and tolerance), points, why the
    right answer is right, and why each wrong choice is tempting."""

    name: str
    kind: str
    answer: str | float
    why: str
    points: float = 1
    rel_tol: float = 0.0
    abs_tol: float = 0.0
    wrong: Mapping[str, str] = field(default_factory=dict)
    model_answer: str | None = None  # for the closing question: a short model answer

    def is_right(self, value) -> bool:
        """Whether an answer matches: the same letter (any case), or a number within
        ``max(rel_tol * |answer|, abs_tol)`` of the answer."""
        if value is None:
            return False
        if self.kind == "choice":
            return str(value).strip().upper() == str(self.answer).upper()
        try:
            value = float(value)
        except (TypeError, ValueError):
            return False
        answer = float(self.answer)
        return math.isfinite(value) and \
            abs(value - answer) <= max(self.rel_tol * abs(answer), self.abs_tol)

    def feedback(self, value) -> str:
        """What a student reads after answering ``value``: right or not, the right answer, why,
        and (for a wrong choice) why that choice was tempting."""
        if value is None:
            return f"not answered; the answer is {self.answer}. {self.why}"
        if self.is_right(value):
            return f"right ({self.answer}). {self.why}"
        tempting = self.wrong.get(str(value).strip().upper(), "")
        return (f"{value!s} is not right; the answer is {self.answer}. {self.why}"
                + (f" Why {str(value).strip().upper()} is tempting: {tempting}" if tempting
                   else ""))


def _lab_of(name: str) -> str:
    """``q04_int4_bytes`` -> ``"04"``; names must start with ``q`` or ``p`` and two digits."""
    if len(name) < 4 or name[0] not in "qp" or not name[1:3].isdigit() or name[3] != "_":
        raise ValueError(f"question names look like q04_topic or p02_topic (lab number after "
                         f"q or p), got {name!r}")
    return name[1:3]


QUIZ_FIELDS = {"name", "kind", "answer", "why", "points", "rel_tol", "abs_tol", "wrong",
               "model_answer"}


def load_keys(lab: int | str, rubric_dir: str | Path = RUBRIC_DIR) -> dict[str, Key]:
    """The ``[[quiz]]`` answer keys of a lab's rubric, by question name ({} if it has none)."""
    path = Path(rubric_dir) / f"lab{int(lab):02d}.toml"
    return keys_from(tomllib.loads(path.read_text()).get("quiz", []), path.name)


def keys_from(tables: list[dict], source: str) -> dict[str, Key]:
    """Answer keys from a rubric's ``[[quiz]]`` tables; errors name ``source``, the entry and
    the field."""
    keys = {}
    for i, raw in enumerate(tables):
        where = f"{source} quiz {i} ({raw.get('name', '?')})"
        unknown = set(raw) - QUIZ_FIELDS
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: "
                             f"{sorted(QUIZ_FIELDS)}")
        kind = raw.get("kind", "choice")
        if kind not in KINDS:
            raise ValueError(f"{where}: unknown kind {kind!r}; choose one of: {', '.join(KINDS)}")
        for need in ("name", "answer", "why"):
            if need not in raw:
                raise ValueError(f"{where}: missing {need!r}")
        _lab_of(raw["name"])
        if kind == "choice" and not (isinstance(raw["answer"], str) and raw["answer"].isalpha()):
            raise ValueError(f"{where}: a choice answer is a letter like \"B\", got "
                             f"{raw['answer']!r}")
        if kind == "number" and not isinstance(raw["answer"], int | float):
            raise ValueError(f"{where}: a number answer must be a number, got {raw['answer']!r}")
        points = raw.get("points", 1)
        if not isinstance(points, int | float) or isinstance(points, bool) or points <= 0:
            raise ValueError(f"{where}: points must be a positive number, got {points!r}")
        key = Key(raw["name"], kind, raw["answer"], raw["why"], points,
                  float(raw.get("rel_tol", 0.0)), float(raw.get("abs_tol", 0.0)),
                  dict(raw.get("wrong", {})), raw.get("model_answer"))
        if key.name in keys:
            raise ValueError(f"{where}: question name {key.name!r} appears twice")
        keys[key.name] = key
    return keys


def _key_for(name: str) -> Key | None:
    try:
        return load_keys(_lab_of(name)).get(name)
    except (OSError, ValueError):  # a student release ships no rubric
        return None


def ask(name: str, question: str, choices: Mapping[str, str] | None = None, *,
        unit: str | None = None) -> None:
    """Show a knowledge check whose answer goes into the notebook variable ``name``.

    ``choices``: ``{"A": text, ...}`` for multiple choice; None for a number (``unit`` names
    its unit). In JupyterLab, Submit sets the variable; the text form says how to type it.
    """
    _lab_of(name)
    lines = [f"Knowledge check {name}: {question}"]
    if choices:
        lines += [f"  {letter}) {text}" for letter, text in choices.items()]
        how = f'set {name} = "{"/".join(choices)}"'
    else:
        how = f"set {name} = <a number{' in ' + unit if unit else ''}>"
    lines.append(f"Answer in the cell above ({how}), or pick and press Submit.")
    text = "\n".join(lines)
    shell = _shell()
    if shell is None:
        print(text)
        return
    from IPython.display import display

    try:
        import ipywidgets as w
    except ImportError:
        print(text)
        return
    current = shell.user_ns.get(name)
    if choices:
        picker = w.RadioButtons(options=[(f"{k}) {v}", k) for k, v in choices.items()],
                                value=current if current in choices else None,
                                layout=w.Layout(width="max-content"))
    else:
        picker = w.FloatText(value=float(current) if isinstance(current, (int, float)) else 0.0,
                             description=unit or "")
    button, out = w.Button(description="Submit", button_style="primary"), w.Output()

    def submit(_button) -> None:
        value = picker.value
        shell.user_ns[name] = value
        out.clear_output()
        with out:
            key = _key_for(name)
            print(f"{name}: {key.feedback(value)}" if key is not None else
                  f"{name} = {value!r} in this session; the feedback comes with grading")
            print(f"To keep the answer for grading, the cell above must say: {name} = {value!r}")

    button.on_click(submit)
    box = w.VBox([w.HTML(f"<b>Knowledge check</b> <code>{name}</code>: {_html(question)}"),
                  picker, button, out])
    # One output: JupyterLab renders the widget, a saved or headless notebook shows the text.
    bundle = box._repr_mimebundle_()
    display({**bundle, "text/plain": text}, raw=True)


def predict(name: str, value) -> None:
    """Acknowledge a prediction (``name`` like ``p02_batch16_speedup``) before its measurement.

    A prediction of None means none was made; ``reveal`` later compares it with the measurement.
    The grader reads it from the lab's own record cell (``labkit.record``), not from here: the
    prediction cell is the student's, so a record published from it would not count.
    """
    _lab_of(name)
    if value is None:
        print(f"{name}: no prediction entered yet: write your guess in the cell above first")
    else:
        print(f"{name}: prediction noted ({value!r}); now run the measurement")


def reveal(name: str, prediction, measured: float, *, unit: str = "") -> dict:
    """Show a prediction beside the measured value and their ratio; returns the comparison."""
    out = {"name": name, "prediction": prediction, "measured": measured,
           "ratio": (measured / float(prediction)
                     if isinstance(prediction, (int, float)) and prediction else None)}
    ratio = f" (measured / predicted = {out['ratio']:.2f})" if out["ratio"] is not None else ""
    shown = "no prediction" if prediction is None else f"{prediction} {unit}".strip()
    print(f"{name}: predicted {shown}, measured {measured:.3g} {unit}{ratio}".rstrip())
    return out


def _shell():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return shell if shell is not None and getattr(shell, "kernel", None) is not None else None


def _html(text: str) -> str:
    import html

    return html.escape(text)
