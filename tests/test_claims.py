"""``labkit.claim``: a verdict computed from the run, shown and stored for ``labkit run``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from labkit.claims import CLAIM_MIME, Claim, cell_claims, claim, read_claims


def test_a_claim_prints_its_verdict_outside_a_kernel(capsys):
    c = claim("batch 16 beats batch 1.", 3.2 > 3, "3.2x.")
    assert c == Claim("batch 16 beats batch 1", True, "3.2x")
    assert capsys.readouterr().out.strip() == "HOLDS: batch 16 beats batch 1 (3.2x)"


def test_a_claim_that_fails_says_so_and_what_to_make_of_it(capsys):
    c = claim("int8 decodes faster", bool(np.float64(1.0) > 2.0), "1.0 vs 2.0 tok/s",
              otherwise="int8 needs a GPU kernel to be faster")
    assert c.holds is False
    out = capsys.readouterr().out
    assert out.startswith("DOES NOT HOLD: int8 decodes faster (1.0 vs 2.0 tok/s)")
    assert "int8 needs a GPU kernel" in out


def test_numpy_bools_are_accepted_and_non_bools_refused():
    assert claim("x", np.bool_(True), "1").holds is True
    with pytest.raises(TypeError, match="holds must be a bool"):
        claim("x", "yes", "1")
    with pytest.raises(ValueError, match="statement and the evidence"):
        claim("x", True, " ")


def test_claims_are_read_back_from_outputs_in_order(tmp_path):
    payloads = [{"text": "a", "holds": True, "evidence": "1", "key": True, "otherwise": None},
                {"text": "b", "holds": False, "evidence": "2", "key": False, "otherwise": "c"}]
    cells = [{"cell_type": "code", "outputs": [{"output_type": "display_data",
                                                "data": {CLAIM_MIME: p, "text/plain": "x"}}]}
             for p in payloads]
    cells.append({"cell_type": "markdown", "source": "no outputs"})
    path = tmp_path / "run.ipynb"
    path.write_text(json.dumps({"cells": cells}))
    assert read_claims(path) == payloads
    assert cell_claims(cells[0]) == payloads[:1]
