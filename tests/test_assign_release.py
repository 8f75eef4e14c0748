"""``labkit assign`` writes a release a student can take home: run from outside the repository,
its zip unpacks to student notebooks, data, a README and labkit's wheel, and holds no solution,
no rubric, no hidden check and no answer-key text (the wheel neither)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import nbformat
import pytest

from labkit.config import DATA_DIR, NOTEBOOKS_DIR, PROJECT_ROOT, RUBRIC_DIR, data_dir
from labkit.course.assign import BEGIN_HIDDEN, BEGIN_SOLUTION, hidden_blocks, solution_lines
from labkit.course.release import lab_time, record_names

SOLUTIONS = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
ASSIGN = [sys.executable, "-c", "import sys; from labkit.cli import main; sys.exit(main())",
          "assign"]
KEYS: dict[Path, Path] = {}  # release folder -> the answer key written beside its course folder


def _assign(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([*ASSIGN, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def unzipped(tmp_path_factory) -> Path:
    """`labkit assign --answer-key key.md` with every other default, run in an empty folder
    outside the repository; the zip unpacked into a fresh folder (its release/ returned)."""
    work = tmp_path_factory.mktemp("course")
    proc = _assign(work, "--answer-key", "key.md")
    assert proc.returncode == 0, proc.stderr
    assert (work / "release").is_dir() and (work / "key.md").is_file()
    fresh = tmp_path_factory.mktemp("student")
    with zipfile.ZipFile(work / "release.zip") as zf:
        zf.extractall(fresh)
    assert sorted(p.name for p in fresh.iterdir()) == ["release"]
    KEYS[fresh / "release"] = work / "key.md"
    return fresh / "release"


def _texts(folder: Path) -> dict[str, str]:
    """Every file of ``folder`` as text; a wheel counts as the text of each file inside it."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix == ".whl":
            with zipfile.ZipFile(p) as whl:
                out.update({f"{p.name}:{n}": whl.read(n).decode("utf-8", "replace")
                            for n in whl.namelist()})
        elif p.is_file():
            out[str(p.relative_to(folder))] = p.read_text()
    return out


def test_release_holds_notebooks_data_readme_and_wheel(unzipped):
    files = sorted(str(p.relative_to(unzipped)) for p in unzipped.rglob("*") if p.is_file())
    data = sorted(f"data/{p.name}" for p in DATA_DIR.iterdir() if p.is_file())
    wheels = [f for f in files if f.endswith(".whl")]
    assert files == sorted(["README.md", *(p.name for p in SOLUTIONS), *data, *wheels])
    assert len(wheels) == 1 and wheels[0].startswith("labkit-")
    for p in SOLUTIONS:
        student = nbformat.read(unzipped / p.name, as_version=4)
        assert not any(c.get("outputs") for c in student.cells)


def test_release_has_no_solution_rubric_hidden_check_or_answer_key(unzipped):
    texts = _texts(unzipped)
    assert not [n for n in texts if "rubrics" in n or n.endswith(".toml")]
    assert not [n for n in texts if ".whl:" in n and n.endswith(".ipynb")]  # no solutions in it
    body = "\n".join(texts.values())
    # labkit's own code may name the markers and compute what an exercise asks (its checks
    # compare with it): solution text is looked for in the notebooks, README and data
    student = "\n".join(t for n, t in texts.items() if ".whl:" not in n)
    assert BEGIN_SOLUTION not in student and BEGIN_HIDDEN not in student
    for path in SOLUTIONS:  # the approach of test_assign: every solution and hidden-test line
        released = nbformat.read(unzipped / path.name, as_version=4)
        student = "\n".join([texts["README.md"], *(c.source for c in released.cells)])
        for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
            hidden = [ln for _, code in hidden_blocks(cell.source) for ln in code.splitlines()]
            for line in [*solution_lines(cell.source, f"cell {i}"), *hidden]:
                if line.strip():
                    assert line not in student, f"{path.name} cell {i}: {line!r} released"
    for rubric in sorted(RUBRIC_DIR.glob("lab*.toml")):  # hidden checks and quiz keys
        table = tomllib.loads(rubric.read_text())
        asserts = [ln.strip() for c in table.get("check", []) for ln in (c.get("code") or "")
                   .splitlines() if ln.strip().startswith("assert")]
        whys = [q["why"] for q in table.get("quiz", []) if q.get("why")]
        model = [table["closing"]["model_answer"]] if "model_answer" in table.get("closing", {}) \
            else []
        for text in [*asserts, *whys, *model]:
            assert text not in body, f"{rubric.name}: {text[:60]!r} in the release"
    for line in KEYS[unzipped].read_text().splitlines():  # the answer key's own text
        for label in ("Why: ", "tempting because: ", "Model answer: "):
            if label in line:
                assert line.split(label, 1)[1] not in body, f"answer key text released: {line}"


def test_student_readme_says_install_times_record_cells_and_hand_in(unzipped):
    readme = (unzipped / "README.md").read_text()
    wheel = next(unzipped.glob("labkit-*.whl")).name
    assert f'pip install "./{wheel}[lab]"' in readme and "jupyter lab" in readme
    assert "make jupyter" in readme and "## What to hand in" in readme
    for p in SOLUTIONS:
        nb = nbformat.read(unzipped / p.name, as_version=4)
        assert f"`{p.name}` | {lab_time(nb)} |" in readme and lab_time(nb)
        for name in (n for names in record_names(nb) for n in names):
            assert f"`{name}`" in readme


def test_record_names_reads_literals_and_loops():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        'labkit.record("a", 1)\nfor n in ("b", "c"):\n    labkit.record(n, 2)\nrecord(f(), 3)')])
    assert record_names(nb) == [["a", "b", "c", "..."]]


def test_wheel_ships_the_data_the_labs_read_and_no_rubric(unzipped, tmp_path):
    """The wheel, unpacked as pip installs it, resolves DATA_DIR inside the package."""
    with zipfile.ZipFile(next(unzipped.glob("labkit-*.whl"))) as whl:
        names = whl.namelist()
        whl.extractall(tmp_path / "site")
    shipped = sorted(n.removeprefix("labkit/data/") for n in names if n.startswith("labkit/data/"))
    assert shipped == sorted(p.name for p in DATA_DIR.iterdir() if p.is_file())
    code = ("import labkit, labkit.config as c; print(labkit.__file__); print(c.DATA_DIR); "
            "print(all((c.DATA_DIR / n).is_file() for n in ('prompts.jsonl', 'eval_text.txt', "
            "'paraphrase_pairs.jsonl'))); print(c.RUBRIC_DIR.exists())")
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert proc.returncode == 0, proc.stderr
    where, data, found, rubrics = proc.stdout.split()
    site = (tmp_path / "site").resolve()
    assert Path(where).is_relative_to(site) and Path(data) == site / "labkit" / "data"
    assert (found, rubrics) == ("True", "False")


def test_data_dir_is_the_repository_s_in_a_checkout_and_the_package_s_elsewhere(tmp_path):
    assert DATA_DIR == PROJECT_ROOT / "data"
    site = tmp_path / "site-packages"
    (site / "labkit" / "data").mkdir(parents=True)
    (site / "data").mkdir()  # some other package's stray data/ folder in site-packages
    assert data_dir(site, site / "labkit") == site / "labkit" / "data"


def test_an_installed_wheel_keeps_its_kernel_state_out_of_site_packages(tmp_path, monkeypatch):
    from labkit.course import kernels

    assert kernels.state_dir() == PROJECT_ROOT / ".cache"
    monkeypatch.setattr(kernels, "in_repository", lambda: False)
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path / "home"))
    assert kernels.state_dir() == tmp_path / "home" / "state"


def test_pyproject_packages_every_subpackage():
    cfg = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(PROJECT_ROOT).parts)
             for p in (PROJECT_ROOT / "labkit").rglob("__init__.py")}
    assert set(cfg["packages"]) == found | {"labkit.data"}
    assert cfg["package-dir"] == {"labkit.data": "data"}


def test_assign_refuses_an_answer_key_inside_the_release_and_a_foreign_folder(
        tmp_path, monkeypatch, capsys):
    from labkit.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["assign", "--no-wheel", "--answer-key", "release/key.md"]) == 2
    assert "inside the release folder" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    assert main(["assign", "--no-wheel", "--out", "mine"]) == 2
    assert "thesis.tex" in capsys.readouterr().err
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"
    assert main(["assign", "--no-wheel", "--no-zip"]) == 0  # a release: replaced next time
    assert main(["assign", "--no-wheel", "--src", str(tmp_path / "none")]) == 2
    assert "pass --src DIR" in capsys.readouterr().err
    assert (tmp_path / "release" / "README.md").is_file()  # a bad --src removes nothing


def test_assign_help_documents_every_flag():
    from labkit.cli.parser import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["assign"]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 20, action.option_strings
    assert {"--src", "--data", "--out", "--no-zip", "--no-wheel", "--answer-key"} <= {
        o for a in sub._actions for o in a.option_strings}
