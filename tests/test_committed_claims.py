"""Every committed run states its key results as claims, and they hold: the CPU notebooks in
``notebooks/`` (the ci profile, what nbval compares against) and the GPU runs in
``results/*/labs/``. A notebook re-executed with a key claim failing cannot be committed green.
"""

from pathlib import Path

import pytest

from labkit.claims import read_claims
from labkit.config import LAB_NOTEBOOKS, NOTEBOOKS_DIR, PROJECT_ROOT

MIN_KEY_CLAIMS = 3
COMMITTED = [*sorted(NOTEBOOKS_DIR.glob(LAB_NOTEBOOKS)),
             *sorted(PROJECT_ROOT.glob("results/*/labs/*.ipynb"))]


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(Path(p).relative_to(PROJECT_ROOT)))
def test_a_committed_run_makes_key_claims_and_they_hold(path):
    claims = read_claims(path)
    key = [c for c in claims if c["key"]]
    assert len(key) >= MIN_KEY_CLAIMS, f"{path}: {len(key)} key claims, a lab makes >= 3"
    failed = [c["text"] for c in key if not c["holds"]]
    assert not failed, f"{path}: key claims that did not hold in the committed run: {failed}"
