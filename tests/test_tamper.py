"""The grader's scan of student code: known ways to reach for the grader are named; the labs'
own solutions and ordinary notebook code are not flagged."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from labkit.config import RUBRIC_DIR
from labkit.course.grading import given_sources, tampering
from labkit.course.rubric import load_rubric
from labkit.course.tamper import scan


@pytest.mark.parametrize("source, finding", [
    ("exec = lambda *a, **k: None", "line 1: rebinds 'exec'"),
    ("def eval(x):\n    return 7", "line 1: defines 'eval'"),
    ("from os import system as compile", "line 1: rebinds 'compile' by import"),
    ("import labkit\nlabkit.record = print",
     "line 2: assigns to 'labkit.record'"),
    ("ip = get_ipython()\nip.display_pub.publish = print", "line 1: calls get_ipython()"),
    ("import json\njson.dumps = str", "line 2: assigns to 'json.dumps'"),
    ("import builtins", "line 1: imports 'builtins'"),
    ("setattr(__builtins__, 'exec', print)", "line 1: calls setattr()"),
    ("import subprocess\nsubprocess.Popen(['sleep', '9'], start_new_session=True)",
     "line 1: imports 'subprocess'"),
    ("import os\nos.system('sleep 9 &')", "line 2: calls os.system()"),
    ("from labkit.serving.cache import eval_in_fresh_process as run\nrun('import subprocess', '1')",
     "line 2: has a string mentioning 'subprocess'"),
    ("open('/proc/1/cmdline').read()", "line 1: has a string mentioning '/proc/'"),
    ("!sleep 9 &", "line 1: runs a shell command"),
])
def test_reaching_for_the_grader_is_named_with_its_line(source, finding):
    assert finding in scan(source)


@pytest.mark.parametrize("source", [
    "import math, json, hashlib, re\nfrom IPython.display import display, Markdown\n"
    "def f(x):\n    return math.ceil(x / 2)\nresult = [f(i) for i in range(3)]",
    "%timeit sum(range(10))\nimport gc\ngc.collect()",
    "import torch\nq = torch.round(w / s).clamp(-127, 127).to(torch.int8)",
    "class Cache:\n    def __init__(self):\n        self.record = {}\n",   # own attribute
    "def broken(:\n    pass",                                               # fails when run
])
def test_ordinary_code_is_not_flagged(source):
    assert scan(source) == []


RUBRICS = sorted(RUBRIC_DIR.glob("lab*.toml"))


@pytest.mark.parametrize("path", RUBRICS, ids=[p.name for p in RUBRICS])
def test_the_labs_own_solutions_are_not_flagged(path: Path):
    rubric = load_rubric(path)
    solution = nbformat.read(rubric.notebook, as_version=4)
    assert tampering(solution, given_sources(rubric)) == []
