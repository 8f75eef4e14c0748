"""A lab run under nbval fails where a key claim does not hold (tests/conftest.py's hook)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_key_claim_that_does_not_hold_fails_its_cell_and_only_it(tmp_path):
    nb = new_notebook(cells=[
        new_code_cell("import labkit\nlabkit.claim('one is less than two', 1 < 2, '1 < 2')"),
        new_code_cell("labkit.claim('two is less than one', 2 < 1, 'measured 2 and 1')"),
        new_code_cell("labkit.claim('an aside', 2 < 1, '2 vs 1', key=False)")],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}})
    probe = tmp_path / "probe.ipynb"
    nbformat.write(nb, probe)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-q", "--rootdir",
                          str(ROOT), "-c", str(ROOT / "pyproject.toml"), str(probe)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    out = run.stdout
    assert run.returncode == 1, out
    assert "1 failed, 2 passed" in out
    assert "::Cell 1 - key claim(s) of this lab did not hold" in out
    assert "two is less than one (measured: measured 2 and 1)" in out
