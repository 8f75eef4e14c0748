"""Which notebooks a ``labkit grade`` folder holds, whose they are, and when they came in.

Two layouts are read (``find_submissions``):

- flat: ``DIR/<student>.ipynb``, one notebook per student, named for the student;
- nested (nbgrader's ``submitted/<student>/...``): ``DIR/<student>/NN_name.ipynb``, or one level
  deeper, ``DIR/<student>/<assignment>/NN_name.ipynb``; the student id is the first folder. A
  student folder may hold several labs: the notebook graded is the one named like the rubric's
  (``00_setup.ipynb``), else the one whose name starts with the lab's ``NN_``; a folder with
  neither is no row of this lab (the gradebook then has no entry for that student and lab).

The submission time (``submitted_at``) is the ISO 8601 text of a ``timestamp.txt`` next to the
notebook (nbgrader writes one there; a trailing `` UTC`` is accepted), else the notebook file's
modification time. A time without an offset is read as UTC, so is a ``--deadline`` without one;
a submission is late when its time is after the deadline (``is_late``). ``sha256`` of the
notebook bytes tells the gradebook whether it changed since it was graded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

TIMESTAMP_FILE = "timestamp.txt"  # nbgrader's name for a submission's time


@dataclass(frozen=True)
class Submission:
    """One student's notebook for one lab: ``key`` (its path under the folder, the grade file's
    ``submission``), ``student``, content hash and submission time (with where it came from)."""

    path: Path
    key: str
    student: str
    sha256: str
    submitted_at: datetime
    time_source: str  # "timestamp.txt" or "file mtime" (or why the timestamp was not used)


def parse_time(text: str, what: str = "time") -> datetime:
    """An ISO 8601 time (``2026-12-01T17:00``, ``...Z``, ``...+01:00``, ``... UTC``) as an aware
    datetime; no offset means UTC. ValueError naming the text otherwise."""
    raw = text.strip()
    raw = raw[:-4] + "+00:00" if raw.endswith(" UTC") else raw
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"bad {what} {text.strip()!r}: give an ISO 8601 time such as "
                         "2026-12-01T17:00:00+00:00 (no offset: UTC)") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _submitted_at(path: Path, nested: bool) -> tuple[datetime, str]:
    stamp = path.parent / TIMESTAMP_FILE
    mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    if nested and stamp.is_file():
        try:
            return parse_time(stamp.read_text(), TIMESTAMP_FILE), TIMESTAMP_FILE
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            return mtime, f"file mtime ({TIMESTAMP_FILE} unreadable: {exc})"
    return mtime, "file mtime"


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def _pick(folder: Path, notebook_name: str) -> list[Path]:
    """The notebooks of one student's folder that are this lab's."""
    found = sorted(p for p in folder.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts
                   and len(p.relative_to(folder).parts) <= 2)
    exact = [p for p in found if p.name == notebook_name]
    prefix = notebook_name.split("_")[0] + "_"
    return exact or [p for p in found if p.name.startswith(prefix)]


def find_submissions(directory: str | Path, notebook_name: str) -> list[Submission]:
    """The submissions in ``directory`` (module doc: flat and nested layouts), sorted by key.
    FileNotFoundError if there are none; ValueError naming a student with two candidate
    notebooks for the lab, or a student id used twice."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"submission folder {str(root)!r} not found")
    subs: list[Submission] = []
    for path in sorted(root.glob("*.ipynb")):
        subs.append(Submission(path, path.name, path.stem, _digest(path),
                               *_submitted_at(path, nested=False)))
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        picked = _pick(folder, notebook_name)
        if len(picked) > 1:
            names = ", ".join(str(p.relative_to(root)) for p in picked)
            raise ValueError(f"student {folder.name!r} has {len(picked)} notebooks for this lab "
                             f"({names}); keep one, named {notebook_name}")
        for path in picked:
            subs.append(Submission(path, path.relative_to(root).as_posix(), folder.name,
                                   _digest(path), *_submitted_at(path, nested=True)))
    if not subs:
        raise FileNotFoundError(f"no submissions in {str(root)!r}: expected <student>.ipynb or "
                                f"<student>/{notebook_name}")
    seen: dict[str, str] = {}
    for sub in subs:
        if sub.student in seen:
            raise ValueError(f"student id {sub.student!r} is used twice ({seen[sub.student]} and "
                             f"{sub.key}); give each student one notebook or one folder")
        seen[sub.student] = sub.key
    return subs


def is_late(sub: Submission, deadline: datetime | None) -> bool:
    """Whether ``sub`` came in after ``deadline`` (never late without one)."""
    return deadline is not None and sub.submitted_at > deadline


def lab_label(lab: str | int) -> str:
    """The gradebook's name of a lab: ``lab00`` for 0, ``"0"``, ``"00"`` or ``"lab00"``; other
    names as given (``fixture``)."""
    text = str(lab).strip().removeprefix("lab")
    return f"lab{int(text):02d}" if text.isdigit() else text
