"""Shared test set-up: offline, project-local Jupyter state, one loaded engine per kind, and the
``slow`` marker on every test that loads the bundled model or is a lab notebook run by nbval
(``make test-fast`` runs ``-m "not slow"``). Tests that start a kernel, Ray, uvicorn or a Redis
server carry ``@pytest.mark.slow`` (or a module ``pytestmark``) themselves."""

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


# A test that uses one of these fixtures, directly or through another fixture, loads a model.
MODEL_FIXTURES = {"hf_engine", "hfcb_engine"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``slow`` the tests that load the bundled model and the notebooks nbval runs."""
    for item in items:
        if item.path.suffix == ".ipynb" or MODEL_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """An nbval cell whose run published a key claim that does not hold fails: a lab's lesson
    must be true for the run that produced it (``labkit.claim``). The outputs are the ones this
    run made (nbval's ``test_outputs``), not the committed ones."""
    outcome = yield
    report = outcome.get_result()
    outputs = getattr(item, "test_outputs", None)
    if call.when != "call" or not report.passed or not outputs:
        return
    from labkit.claims import CLAIM_MIME

    failed = [c for out in outputs if CLAIM_MIME in (out.get("data") or {})
              for c in [out["data"][CLAIM_MIME]] if c.get("key", True) and not c.get("holds")]
    if failed:
        report.outcome = "failed"
        report.longrepr = "key claim(s) of this lab did not hold in this run:\n" + "\n".join(
            f"- {c['text']} (measured: {c['evidence']})" for c in failed)


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
