"""The instructors' answer key: every knowledge check with its answer and why, one page.

Generated from the two places a question lives, so they cannot drift apart: the question and its
choices from the ``labkit.ask(...)`` call in the solution notebook, the answer, the explanation
and why each wrong choice is tempting from the rubric's ``[[quiz]]`` table, and the closing
question's model answer from the rubric's ``[closing]`` table. A question without a key, or a
key without a question, is an error naming both places.
"""

from __future__ import annotations

import ast
from pathlib import Path

from labkit.config import LAB_NOTEBOOKS, NOTEBOOKS_DIR


def questions_in(nb_path: str | Path) -> dict[str, dict]:
    """``{name: {"question", "choices", "unit"}}`` of every ``labkit.ask`` call with literal
    arguments in a notebook's code cells."""
    import nbformat

    from labkit.course.tamper import python_source

    found = {}
    for i, cell in enumerate(nbformat.read(str(nb_path), as_version=4).cells):
        if cell.cell_type != "code" or "ask(" not in cell.source:
            continue
        for node in ast.walk(ast.parse(python_source(cell.source))):
            fn = node.func if isinstance(node, ast.Call) else None
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if name != "ask" or len(node.args) < 2:
                continue
            try:
                args = [ast.literal_eval(a) for a in node.args[:3]]
                kw = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            except ValueError:
                raise ValueError(f"{Path(nb_path).name} cell {i}: labkit.ask needs literal "
                                 f"arguments (the answer key reads them)") from None
            found[args[0]] = {"question": args[1],
                              "choices": args[2] if len(args) > 2 else kw.get("choices"),
                              "unit": kw.get("unit")}
    return found


def lab_key(rubric) -> str:
    """The answer key of one lab (a loaded ``Rubric``) as Markdown."""
    keys = {c.name: c.quiz for c in rubric.checks if c.quiz is not None}
    asked = questions_in(rubric.notebook)
    nb = rubric.notebook.name
    missing = sorted(set(asked) - set(keys))
    if missing:
        raise ValueError(f"{nb} asks {missing} but the lab {rubric.lab} rubric has no [[quiz]] "
                         f"key for them")
    unasked = sorted(set(keys) - set(asked))
    if unasked:
        raise ValueError(f"the lab {rubric.lab} rubric keys {unasked} but {nb} never asks them")
    lines = [f"## Lab {rubric.lab} ({nb})", ""]
    for name, key in keys.items():
        q = asked[name]
        lines += [f"**{name}** ({key.points:g} point{'s' if key.points != 1 else ''}): "
                  f"{q['question']}", ""]
        for letter, text in (q["choices"] or {}).items():
            mark = " **(answer)**" if letter == key.answer else ""
            lines.append(f"- {letter}) {text}{mark}")
            if letter in key.wrong:
                lines.append(f"  - tempting because: {key.wrong[letter]}")
        if not q["choices"]:
            tol = max(key.rel_tol * abs(float(key.answer)), key.abs_tol)
            unit = f" {q['unit']}" if q["unit"] else ""
            lines.append(f"- answer: {key.answer:g}{unit} (accepted within +/- {tol:g}{unit})")
        lines += ["", f"Why: {key.why}", ""]
    if rubric.closing:
        lines += [f"**Question to think about:** {rubric.closing['question']}", "",
                  f"Model answer: {rubric.closing['model_answer']}", ""]
    return "\n".join(lines)


def answer_key(src_dir: str | Path = NOTEBOOKS_DIR, pattern: str = LAB_NOTEBOOKS) -> str:
    """The whole course's answer key (Markdown): every lab that has a rubric, in order."""
    from labkit.course.rubric import load_rubric, rubric_path

    parts = ["# Answer key (instructors only: do not hand out)", ""]
    for nb in sorted(Path(src_dir).glob(pattern)):
        lab = nb.name[:2]
        if not lab.isdigit() or not rubric_path(lab).is_file():
            continue
        rubric = load_rubric(lab)
        if any(c.quiz is not None for c in rubric.checks) or rubric.closing:
            parts.append(lab_key(rubric))
    return "\n".join(parts)
