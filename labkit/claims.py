"""Verdicts computed from the run: a lab states an outcome only through ``claim``.

A lab's markdown gives the expectation and the reasoning ("we expect batch 16 to decode several
times the tokens/s of batch 1, because ..."); whether that happened in *this* run is decided by
the numbers the run measured::

    labkit.claim("static batch 16 decodes at least 3x the tokens/s of batch 1",
                 holds=speedup >= 3, evidence=f"batch 1: {b1:.1f} tok/s, batch 16: {b16:.1f} "
                 f"tok/s ({speedup:.1f}x)",
                 otherwise="this run is overhead-bound: ...")

The notebook shows the verdict (holds / does not hold, the evidence, and ``otherwise`` when it
does not hold), and the claim is stored in the cell's outputs under its own MIME type, so
``labkit run`` lists every claim with ``holds`` and its evidence in ``summary.json`` and the
report without running anything again. ``key=True`` marks a claim the lab's lesson depends on:
the ci profile must make every key claim hold (a test runs the labs and checks).
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass
from pathlib import Path

CLAIM_MIME = "application/vnd.labkit.claim+json"


@dataclass(frozen=True)
class Claim:
    """One checked statement about a run: its text, whether it held, the numbers behind it."""

    text: str
    holds: bool
    evidence: str
    key: bool = True
    otherwise: str | None = None

    def verdict(self) -> str:
        """One line of plain text: HOLDS / DOES NOT HOLD, the statement, the evidence."""
        line = f"{'HOLDS' if self.holds else 'DOES NOT HOLD'}: {self.text} ({self.evidence})"
        if not self.holds and self.otherwise:
            line += f". {self.otherwise}"
        return line

    def _repr_markdown_(self) -> str:
        mark = "holds" if self.holds else "does not hold"
        text = f"**Claim {mark}:** {self.text}. *Measured:* {self.evidence}."
        if not self.holds and self.otherwise:
            text += f" {self.otherwise}"
        return text


def claim(text: str, holds: bool, evidence: str, *, key: bool = True,
          otherwise: str | None = None) -> Claim:
    """Check ``text`` against this run and show the verdict in the cell's output.

    ``holds`` must be computed from measured values (never a literal); ``evidence`` names the
    numbers it was decided on, with units; ``otherwise`` says what the student should make of a
    claim that does not hold (why this run cannot show it, where the effect does show).
    ``key``: the lesson depends on it (the ci profile must make it hold). Returns the Claim.
    """
    if not isinstance(holds, bool):
        try:  # numpy.bool_ and friends
            holds = bool(holds.item())
        except AttributeError:
            raise TypeError(f"holds must be a bool computed from the run, got {holds!r}") from None
    if not text.strip() or not str(evidence).strip():
        raise ValueError("a claim needs a statement and the evidence it was decided on")
    found = Claim(text.strip().rstrip("."), holds, str(evidence).strip().rstrip("."), key,
                  otherwise)
    _show(found)
    return found


def _show(found: Claim) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        get_ipython = None
    if get_ipython is None or get_ipython() is None:  # a plain script: print the verdict
        print(found.verdict())
        return
    color = "#1a7f37" if found.holds else "#b35900"
    body = html.escape(found.text) + ". <i>Measured:</i> " + html.escape(found.evidence) + "."
    if not found.holds and found.otherwise:
        body += " " + html.escape(found.otherwise)
    display({"text/plain": found.verdict(),
             "text/markdown": found._repr_markdown_(),
             "text/html": (f"<p style='border-left:4px solid {color};padding-left:.6em'>"
                           f"<b>Claim {'holds' if found.holds else 'does not hold'}:</b> "
                           f"{body}</p>"),
             CLAIM_MIME: asdict(found)}, raw=True)


def cell_claims(cell) -> list[dict]:
    """The claims stored in one executed notebook cell's outputs."""
    return [out["data"][CLAIM_MIME] for out in cell.get("outputs", [])
            if CLAIM_MIME in out.get("data", {})]


def read_claims(path: str | Path) -> list[dict]:
    """Every claim of an executed notebook, in order: ``{"text", "holds", "evidence", "key",
    "otherwise"}``."""
    nb = json.loads(Path(path).read_text())
    return [c for cell in nb.get("cells", []) for c in cell_claims(cell)]
