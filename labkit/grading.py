"""Recorded results in notebook outputs: ``record(name, value)`` and ``read_records(path)``.

A record is a display output with its own MIME type, so it survives papermill execution and can
be read back from the executed ``.ipynb`` without running anything.
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


def read_records(path: str | Path) -> dict:
    """All records of an executed notebook as ``{name: value}`` (the last one of a name wins)."""
    nb = json.loads(Path(path).read_text())
    found = {}
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            payload = out.get("data", {}).get(RECORD_MIME)
            if payload is not None:
                found[payload["name"]] = payload["value"]
    return found
