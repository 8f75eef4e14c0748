"""Shared test set-up: offline, project-local Jupyter state, and one loaded engine per kind."""

from __future__ import annotations

import os
import tempfile

import pytest

# Before anything imports transformers or Jupyter: offline, no writes to ~.
_state = tempfile.mkdtemp(prefix="labkit-test-state-")
for var, sub in [("JUPYTER_CONFIG_DIR", "jupyter/config"), ("JUPYTER_DATA_DIR", "jupyter/data"),
                 ("JUPYTER_RUNTIME_DIR", "jupyter/runtime"), ("IPYTHONDIR", "ipython"),
                 ("MPLCONFIGDIR", "matplotlib")]:
    os.environ.setdefault(var, os.path.join(_state, sub))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LABKIT_PROFILE", "ci")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads crawl on 2 cores


@pytest.fixture(scope="session")
def hf_engine():
    """The bundled model behind the static-batching engine (fp32 on CPU), shared by tests."""
    from labkit.engines import get_engine

    engine = get_engine("hf", model="smollm2-135m")
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def hfcb_engine():
    """The bundled model behind transformers' continuous batching manager."""
    from labkit.engines import get_engine

    engine = get_engine("hf-cb", model="smollm2-135m")
    yield engine
    engine.close()


@pytest.fixture(autouse=True)
def _cwd_left_alone():
    """Fail the test that moves this process's cwd: later tests and nbval resolve paths from it."""
    before = os.getcwd()
    yield
    after = os.getcwd()
    if after != before:
        os.chdir(before)
        pytest.fail(f"the test changed the process cwd from {before} to {after}")
