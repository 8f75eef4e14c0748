"""Executed runs into the committed solution notebooks: outputs kept, run artifacts dropped.

The labs are committed with the outputs of a ci run (nbval compares the cells marked
``NBVAL_CHECK_OUTPUT`` with them). An executed notebook from ``labkit run`` also carries
papermill's ``injected-parameters`` cell (``PROFILE = "ci"``: it would silently override
``PROFILE = "auto"`` for everyone who opens the notebook on a GPU, and shift every cell number a
student sees by one) and papermill's per-cell metadata. ``publish`` writes the executed notebook
over its source without them, after checking that the code is the source's own.
``strip_injected`` removes only that cell from a notebook already committed with it (a run from
before ``publish``), and ``injected_cells`` finds them (tests/test_notebooks_clean.py).
"""

from __future__ import annotations

import copy
from pathlib import Path

from labkit.course.runner import ERROR_TAG, INJECTED_TAG


def without_run_artifacts(nb):
    """A copy of an executed notebook (nbformat v4) without papermill's injected-parameters
    cell, its error banners and its metadata; outputs and execution counts stay."""
    out = copy.deepcopy(nb)
    out.cells = [c for c in out.cells
                 if not {INJECTED_TAG, ERROR_TAG} & set(c.get("metadata", {}).get("tags", []))]
    for cell in out.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    out.metadata.pop("papermill", None)
    return out


def injected_cells(nb) -> list[int]:
    """Indices of the cells of ``nb`` (nbformat v4) tagged ``injected-parameters``."""
    return [i for i, c in enumerate(nb.cells)
            if INJECTED_TAG in c.get("metadata", {}).get("tags", [])]


def strip_injected(path: str | Path) -> int:
    """Remove papermill's ``injected-parameters`` cells from the notebook at ``path`` in place,
    leaving every other cell, output and metadata as it was; returns how many were removed (the
    file is not rewritten when there were none)."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    drop = set(injected_cells(nb))
    if drop:
        nb.cells = [c for i, c in enumerate(nb.cells) if i not in drop]
        nbformat.write(nb, str(path))
    return len(drop)


def _code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def publish(executed: str | Path, source: str | Path) -> Path:
    """Write ``executed`` (a ``labkit run`` output) over ``source`` without run artifacts.

    Refuses (ValueError) when the executed notebook failed (a papermill error banner) or when
    its code cells differ from the source's: outputs of other code must not be committed.
    """
    import nbformat

    run = nbformat.read(str(executed), as_version=4)
    if any(ERROR_TAG in c.get("metadata", {}).get("tags", []) for c in run.cells):
        raise ValueError(f"{executed}: the run failed (papermill error cell); not publishing it")
    clean = without_run_artifacts(run)
    src = nbformat.read(str(source), as_version=4)
    if _code(clean) != _code(without_run_artifacts(src)):
        raise ValueError(f"{executed}: its code differs from {source}; re-run the lab on the "
                         f"current source before publishing")
    nbformat.write(clean, str(source))
    return Path(source)
