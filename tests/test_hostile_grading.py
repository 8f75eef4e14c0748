"""Hostile submissions: grading that a submission cannot fool, escape, or use to harm another.

One batch of the fixture lab is graded with the static scan switched off, as if every attack
had slipped past it: each attack below is one that worked against the grader that ran checks
inside the student's kernel (issue 20). Stubs and forgeries get no points for what they forged,
the victims graded after them keep full marks, nothing is written outside a submission's own
folder, the grade file is unchanged once ``grade`` returns, no process a submission started is
alive afterwards, and a 3 GiB allocation under a 2 GiB limit ends that submission with a clear
reason. The scan itself is checked on the same attacks, without running them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import nbformat
import pytest
from fixtures.fixture_lab import RECORD_CELL, RUBRIC_TOML, write_fixture_lab
from nbformat.v4 import new_code_cell

from labkit.config import PROJECT_ROOT, RUBRIC_DIR
from labkit.course.assign import make_student_notebooks
from labkit.course.rubric import load_rubric
from labkit.course.sandbox import unavailable
from labkit.course.scoring import normalized
from labkit.course.tamper import scan

TOKEN = "labkit-hostile-7f3a9c"  # in every process and file an attack leaves behind
needs_sandbox = pytest.mark.skipif(unavailable() is not None,
                                   reason=f"no sandbox here: {unavailable()}")

HOOK = '''def add(a, b):
    return 0
from IPython import get_ipython
from IPython.display import display
def _forge(result):
    for name in ("add_n_4", "__labkit_grader__:0123:hidden:add_hidden"):
        display({"application/vnd.labkit.record+json": {"name": name, "value": 7},
                 "text/plain": "forged"}, raw=True)
get_ipython().events.register("post_run_cell", _forge)'''
JSON_ALIAS = '''def add(a, b):
    return 0
import sys as _s, types as _t, json as _j
_s.modules["labkit.records"].json = _t.SimpleNamespace(loads=lambda text: 7, dumps=_j.dumps)'''
SHADOW = '''def abs(x):
    return 0.0
def add(a, b):
    return a * b'''
PRINTS = '''def add(a, b):
    print('{"ready": true, "problems": []}')
    print('{"passed": true, "value": 7}')
    return a - b'''
DETACH = '''import os, sys
os.environ.pop("LABKIT_GRADE_RUN", None)
_code = """import pathlib, time
for _ in range(240):
    try:
        pathlib.Path("CSV").write_text("hacked")
    except OSError:
        pass
    time.sleep(0.25)
# TOKEN"""
import asyncio
await asyncio.create_subprocess_exec(sys.executable, "-c", _code, start_new_session=True)'''
BASH = '''%%bash
env -u LABKIT_GRADE_RUN setsid nohup \\
  sh -c 'while true; do echo hacked > "CSV"; sleep 0.25; done # TOKEN' >/dev/null 2>&1 &'''
SPY = '''def add(a, b):
    raise NotImplementedError
import glob, json, os, shutil
_seen = set([SUBS])
for _pid in ("self", str(os.getppid()), "1"):
    for _what in ("cwd", "cmdline", "environ"):
        try:
            _p = f"/proc/{_pid}/{_what}"
            _text = os.readlink(_p) if _what == "cwd" else open(_p, "rb").read().decode()
        except OSError:
            continue
        _seen |= {w for w in _text.replace("\\0", " ").split() if os.path.isdir(w)}
for _d in _seen:
    for _f in glob.glob(os.path.join(_d, "*.ipynb")):
        try:
            if "z_victim_copied" in _f:
                shutil.copy(_f, "stolen.ipynb")
            if "z_victim_overwritten" in _f:
                open(_f, "w").write("{}")
        except OSError as exc:
            print("refused:", exc)
try:
    _nb = json.load(open("stolen.ipynb"))
    exec("".join(next(c["source"] for c in _nb["cells"] if "def add(" in "".join(c["source"]))))
except (OSError, StopIteration) as exc:
    print("nothing stolen:", exc)'''
STARTUP = '''import os
_evil = "import labkit\\nlabkit.record = lambda *a, **k: None  # TOKEN\\n"
for _t in (os.path.join(os.environ.get("IPYTHONDIR", "~/.ipython"), "profile_default/startup"),
           os.path.expanduser("~/.ipython/profile_default/startup"),
           PROJECT_STARTUP, GRADER_STARTUP):
    try:
        os.makedirs(_t, exist_ok=True)
        open(os.path.join(_t, "00-TOKEN.py"), "w").write(_evil)
    except OSError as exc:
        print("refused:", exc)
for _d in (os.getcwd(), GRADER_CWD, "/tmp", os.path.dirname("CSV")):
    try:
        open(os.path.join(_d, "sitecustomize.py"), "w").write("raise SystemExit  # TOKEN\\n")
        open(os.path.join(_d, "TOKEN.txt"), "w").write("here")
    except OSError as exc:
        print("refused:", exc)'''
PEEK = '''import os
_seen = []
for _p in (RUBRIC_DIR, SOLUTION, SUBS, NOTEBOOKS):
    try:
        _v = os.listdir(_p) if os.path.isdir(_p) else open(_p).read(80)
    except OSError:
        continue
    if _v:
        _seen.append((_p, _v))
if _seen:
    raise RuntimeError(f"saw {_seen}")'''
NETWORK = 'import socket\nsocket.create_connection(("1.1.1.1", 53), timeout=5)'
MEMORY = "_hog = bytearray(3 * 2**30)  # 3 GiB under a 2 GiB limit"
THREADS = '''import threading, time
_threads = [threading.Thread(target=time.sleep, args=(60,), daemon=True) for _ in range(400)]
for _t in _threads:
    _t.start()'''
C_LOOP = '''def add(a, b):
    if a < 0:
        sum(range(10**13))       # one C call: no signal handler runs until it returns
    return a + b'''
EXITS = '''def add(a, b):
    if a < 0:
        import os
        os._exit(0)              # ends the trusted interpreter, answer unsent
    return a + b'''
LIMITS = "\n[limits]\nmemory_mib = 2048\nprocesses = 128\n"


def _at(nb, text: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if text in c.source)


def _fill(code: str, names: dict[str, str]) -> str:
    for key, value in names.items():
        code = code.replace(key, value)
    return code


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """The hostile batch graded once, with the scan off: (rows, grade file text, paths)."""
    tmp = tmp_path_factory.mktemp("hostile")
    solution, toml = write_fixture_lab(tmp / "lab")
    toml.write_text(RUBRIC_TOML + LIMITS)
    [student] = make_student_notebooks(tmp / "lab", tmp / "release", pattern="99_*.ipynb")
    subs, out = tmp / "submissions", tmp / "out"
    subs.mkdir()
    csv = out / "grades.csv"
    names = {"CSV": str(csv), "SUBS": repr(str(subs)), "TOKEN": TOKEN,
             "PROJECT_STARTUP": repr(str(PROJECT_ROOT / ".cache/ipython/profile_default/startup")),
             "GRADER_STARTUP": repr(os.path.join(os.environ["IPYTHONDIR"],
                                                 "profile_default/startup")),
             "GRADER_CWD": repr(os.getcwd()), "RUBRIC_DIR": repr(str(RUBRIC_DIR)),
             "SOLUTION": repr(str(solution)), "NOTEBOOKS": repr(str(PROJECT_ROOT / "notebooks"))}

    def write(name: str, base: Path, exercise: str | None = None, before_record: str = "",
              record_prefix: str = "", after_setup: str = "") -> None:
        nb = nbformat.read(base, as_version=4)
        if exercise is not None:
            nb.cells[_at(nb, "def add(")].source = _fill(exercise, names)
            del nb.cells[_at(nb, "assert add(2, 3)")]
        rec = _at(nb, RECORD_CELL)
        nb.cells[rec].source = record_prefix + nb.cells[rec].source
        if before_record:
            nb.cells.insert(rec, new_code_cell(_fill(before_record, names)))
        if after_setup:
            nb.cells.insert(_at(nb, "resolve_profile") + 1,
                            new_code_cell(_fill(after_setup, names)))
        nbformat.write(nb, subs / name)

    write("a_hook.ipynb", student, HOOK)
    write("a_json_alias.ipynb", student, JSON_ALIAS)
    write("a_shadow_abs.ipynb", student, SHADOW)
    write("a_prints.ipynb", student, PRINTS)
    write("a_detach.ipynb", solution, after_setup=DETACH)
    write("a_bash.ipynb", solution, after_setup=BASH)
    write("a_spy.ipynb", student, SPY)
    write("a_startup.ipynb", solution, after_setup=STARTUP)
    write("a_peek.ipynb", solution, after_setup=PEEK)
    write("a_magic_line.ipynb", solution, record_prefix="%system true\n")
    write("a_network.ipynb", solution, before_record=NETWORK)
    write("a_memory.ipynb", solution, before_record=MEMORY)
    write("a_threads.ipynb", solution, before_record=THREADS)
    write("a_c_loop.ipynb", student, C_LOOP)
    write("a_exits.ipynb", student, EXITS)
    for victim in ("z_victim_copied", "z_victim_overwritten", "z_victim_late"):
        shutil.copy(solution, subs / f"{victim}.ipynb")
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in subs.iterdir()}
    outside = [Path(os.getcwd()) / "sitecustomize.py", Path("/tmp/sitecustomize.py"),
               Path(os.getcwd()) / f"{TOKEN}.txt", Path("/tmp") / f"{TOKEN}.txt",
               out / "sitecustomize.py",
               PROJECT_ROOT / ".cache/ipython/profile_default/startup" / f"00-{TOKEN}.py",
               Path(os.environ["IPYTHONDIR"]) / "profile_default/startup" / f"00-{TOKEN}.py"]
    before = {p for p in outside if p.exists()}

    from labkit.course import batch as grade_batch
    from labkit.course import grading

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grading, "tampering", lambda nb, given: [])  # every attack gets through
        mp.setattr(grade_batch, "CHECK_TIMEOUT_S", 5)
        frame = grading.grade(subs, "99", csv, timeout_s=60, rubric=load_rubric(toml))
    returned = csv.read_text()
    time.sleep(2)  # a survivor would rewrite the grade file now
    yield {"rows": frame.set_index("submission"), "csv": csv, "returned": returned,
           "subs": subs, "digests": digests, "outside": outside, "before": before}


def _row(batch, name: str):
    return batch["rows"].loc[name]


@pytest.mark.slow
@needs_sandbox
@pytest.mark.parametrize("name", ["a_hook.ipynb", "a_json_alias.ipynb", "a_shadow_abs.ipynb",
                                  "a_prints.ipynb", "a_spy.ipynb"])
def test_stubs_and_forgeries_get_nothing_for_what_they_forged(batch, name):
    row = _row(batch, name)
    assert (row.setup, row.add_n_4, row.add_hidden, row.add_floats) == (1, 0, 0, 0), row.feedback


@pytest.mark.slow
@needs_sandbox
def test_a_forged_record_after_the_record_cell_disagrees_with_the_recomputation(batch):
    assert "recorded 7 but add(N, 4) gives 0" in _row(batch, "a_hook.ipynb").feedback


@pytest.mark.slow
@needs_sandbox
@pytest.mark.parametrize("name, why", [("a_c_loop.ipynb", "TimeoutError: took longer than 5 s"),
                                       ("a_exits.ipynb", "no answer from the trusted interpreter")])
def test_a_check_that_never_answers_fails_alone(batch, name, why):
    row = _row(batch, name)
    assert (row.setup, row.add_n_4, row.add_hidden, row.add_floats) == (1, 3, 0, 2), row.feedback
    assert why in row.feedback


@pytest.mark.slow
@needs_sandbox
def test_victims_keep_full_marks_and_their_files(batch):
    for victim in ("z_victim_copied.ipynb", "z_victim_overwritten.ipynb", "z_victim_late.ipynb"):
        row = _row(batch, victim)
        assert (row.status, row.total) == ("ok", 8), (victim, row.reason, row.feedback)
    now = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in batch["subs"].iterdir()}
    assert now == batch["digests"]


@pytest.mark.slow
@needs_sandbox
def test_attacks_that_only_reach_outward_keep_the_points_of_the_work(batch):
    for name in ("a_detach.ipynb", "a_bash.ipynb", "a_startup.ipynb", "a_peek.ipynb"):
        row = _row(batch, name)
        assert (row.status, row.total) == ("ok", 8), (name, row.reason, row.feedback)


@pytest.mark.slow
@needs_sandbox
def test_nothing_is_written_outside_the_submissions_folders(batch):
    assert {p for p in batch["outside"] if p.exists()} == batch["before"]
    assert sorted(p.name for p in batch["csv"].parent.iterdir()) == ["grades.csv",
                                                                     "grades_executed"]


@pytest.mark.slow
@needs_sandbox
def test_the_grade_file_is_unchanged_after_grade_returns(batch):
    assert batch["csv"].read_text() == batch["returned"]
    assert "hacked" not in batch["returned"]


@pytest.mark.slow
@needs_sandbox
def test_no_process_a_submission_started_is_alive_afterwards(batch):
    alive = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and TOKEN.encode() in (proc / "cmdline").read_bytes():
                alive.append(proc.name)
        except OSError:
            pass
    assert alive == []


@pytest.mark.slow
@needs_sandbox
def test_a_magic_line_makes_a_record_cell_untrusted(batch):
    row = _row(batch, "a_magic_line.ipynb")
    assert (row.add_n_4, row.add_hidden, row.add_floats) == (0, 2, 2)
    assert "ignored 1 record(s)" in row.feedback


@pytest.mark.slow
@needs_sandbox
def test_a_submission_has_no_network(batch):
    row = _row(batch, "a_network.ipynb")
    assert row.status == "error" and "unreachable" in row.reason, row.reason


@pytest.mark.slow
@needs_sandbox
def test_three_gib_under_a_two_gib_limit_ends_that_submission_with_a_clear_reason(batch):
    row = _row(batch, "a_memory.ipynb")
    assert row.status == "error" and row.reason.startswith("MemoryError in cell 7"), row.reason
    assert "2048 MiB of memory" in row.reason
    assert (row.setup, row.add_hidden, row.add_floats) == (1, 2, 2)


@pytest.mark.slow
@needs_sandbox
def test_the_process_limit_stops_a_thread_bomb(batch):
    row = _row(batch, "a_threads.ipynb")
    assert row.status == "error" and "can't start new thread" in row.reason, row.reason


@pytest.mark.slow
def test_without_a_sandbox_grading_warns_on_every_row(tmp_path):
    solution, toml = write_fixture_lab(tmp_path / "lab")
    subs = tmp_path / "subs"
    subs.mkdir()
    shutil.copy(solution, subs / "one.ipynb")
    from labkit.course import grading

    frame = grading.grade(subs, "99", tmp_path / "g.csv", rubric=load_rubric(toml), sandbox=False)
    assert list(frame.total) == [8]
    assert all(grading.UNSAFE in reason for reason in frame.reason)


def test_grading_refuses_where_no_sandbox_can_be_had(tmp_path, monkeypatch):
    solution, toml = write_fixture_lab(tmp_path / "lab")
    from labkit.course import grading

    monkeypatch.setattr(grading, "unavailable", lambda: "bwrap not found")
    with pytest.raises(RuntimeError, match="bwrap not found; pass --no-sandbox"):
        grading.grade(tmp_path / "lab", "99", tmp_path / "g.csv", rubric=load_rubric(toml))


@pytest.mark.parametrize("source, finding", [
    (HOOK, "calls IPython.get_ipython()"),
    (JSON_ALIAS, "uses 'modules'"),
    (DETACH, "calls asyncio.create_subprocess_exec()"),
    (BASH, "uses the %%bash magic"),
    (SPY, "has a string mentioning '/proc/'"),
    ("%system ls", "uses the %system magic"),
    ("x = getattr(__builtins__, 'ex' + 'ec')", "reads '__builtins__' by name (getattr)"),
    ("from os import system as run\nrun('sleep 9 &')", "calls os.system()"),
    ("%timeit import builtins", "imports 'builtins'"),
    ("(1).__class__.__base__.__subclasses__()", "uses '__subclasses__'"),
])
def test_the_scan_names_each_attack_without_running_it(source, finding):
    assert any(finding in f for f in scan(source)), scan(source)


def test_a_magic_line_changes_what_a_cell_is():
    assert normalized("%system true\n" + RECORD_CELL) != normalized(RECORD_CELL)
    assert normalized("# a comment\n" + RECORD_CELL) == normalized(RECORD_CELL)


def test_graded_definitions_leave_calls_and_shadowed_names_to_the_student():
    from labkit.course.trusted import definitions

    nb = nbformat.v4.new_notebook(cells=[
        new_code_cell("import math\nimport os"),
        new_code_cell("def abs(x):\n    return 0.0\nSCALE = 2 / 3\nos.system('x')\n"
                      "def add(a, b):\n    return math.floor(a) + b")])
    for cell in nb.cells:
        cell.metadata["papermill"] = {"start_time": "now"}
    pieces = dict(definitions(nb, ["add"]))
    assert pieces["cell 0"] == "import math"
    assert "os.system" not in pieces["cell 1"] and "SCALE = 2 / 3" in pieces["cell 1"]
    assert json.dumps(pieces)  # plain text, sent to the trusted interpreter as JSON
