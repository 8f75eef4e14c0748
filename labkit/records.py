"""Recorded results: what a lab publishes for the run report and the grader to read back.

``record(name, value)`` (``labkit.record`` in the notebooks) stores a JSON value as a display
output of its own MIME type, so it survives papermill execution and can be read back from the
executed ``.ipynb`` without running anything (``read_records``, ``cell_records``). The grader
counts a record only from the lab's own record cells, and as a claim: its hidden tests and
recomputations run elsewhere (``labkit.course.grading``).
"""

from __future__ import annotations

import json
from pathlib import Path

RECORD_MIME = "application/vnd.labkit.record+json"


def record(name: str, value) -> None:
    """Store a JSON-serialisable ``value`` under ``name`` in the current cell's outputs."""
    from IPython.display import display

    payload = {"name": name, "value": json.loads(json.dumps(value))}
    display({RECORD_MIME: payload, "text/plain": f"recorded {name} = {value!r}"}, raw=True)


def cell_records(cell) -> list[dict]:
    """The record payloads (``{"name", "value"}``) among one executed cell's outputs."""
    return [out["data"][RECORD_MIME] for out in cell.get("outputs", [])
            if RECORD_MIME in out.get("data", {})]


def read_records(path: str | Path) -> dict:
    """All records of an executed notebook as ``{name: value}`` (the last one of a name wins)."""
    nb = json.loads(Path(path).read_text())
    return {p["name"]: p["value"] for cell in nb.get("cells", []) for p in cell_records(cell)}
