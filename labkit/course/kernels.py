"""Jupyter kernels for headless runs (``labkit run``, ``labkit grade``) and where state lives.

``prepare_kernel`` registers a kernel spec that runs *this* Python (``sys.executable``), with
optional extra environment (a GPU to see, the grader's mark), in a project-local or temporary
Jupyter dir, so a run works as root, with a read-only home and without a system-wide Jupyter
install; ``remove_kernel`` deletes a spec made for one run. ``state_dir`` is where Jupyter,
IPython and matplotlib keep their state meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from labkit.config import PROJECT_ROOT


def state_dir() -> Path:
    """Where Jupyter/IPython/matplotlib state goes: ``<project>/.cache`` if writable, else temp."""
    root = PROJECT_ROOT / ".cache"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    uid = os.getuid() if hasattr(os, "getuid") else 0
    tmp = Path(tempfile.gettempdir()) / f"labkit-state-{uid}"
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def _kernel_specs() -> Path:
    """The folder ``prepare_kernel`` puts on JUPYTER_PATH; its specs are in ``kernels/``."""
    return state_dir() / "jupyter" / "path"


def remove_kernel(name: str) -> None:
    """Delete a kernel spec ``prepare_kernel`` wrote (e.g. one made for a single grading run)."""
    shutil.rmtree(_kernel_specs() / "kernels" / name, ignore_errors=True)


def prepare_kernel(env: Mapping[str, str] | None = None) -> str:
    """Point Jupyter state at writable dirs and register a kernel for ``sys.executable``.

    Sets JUPYTER_CONFIG_DIR / JUPYTER_DATA_DIR / JUPYTER_RUNTIME_DIR / IPYTHONDIR / MPLCONFIGDIR
    where unset, writes ``kernels/<name>/kernel.json`` under a dir prepended to JUPYTER_PATH, and
    returns the kernel name to hand to papermill. ``env``: extra environment of that kernel
    (e.g. ``{"CUDA_VISIBLE_DEVICES": "1"}``), one kernel name per distinct env. Idempotent and
    cheap (no subprocess).
    """
    base = state_dir()
    for var, sub in [("JUPYTER_CONFIG_DIR", "jupyter/config"), ("JUPYTER_DATA_DIR", "jupyter/data"),
                     ("JUPYTER_RUNTIME_DIR", "jupyter/runtime"), ("IPYTHONDIR", "ipython"),
                     ("MPLCONFIGDIR", "matplotlib")]:
        if not os.environ.get(var):
            os.environ[var] = str(base / sub)
        Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
    extra = dict(env or {})
    tag = sys.executable + (json.dumps(extra, sort_keys=True) if extra else "")
    name = "labkit-py-" + hashlib.sha256(tag.encode()).hexdigest()[:8]
    spec_root = _kernel_specs()
    spec_dir = spec_root / "kernels" / name
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python {platform.python_version()} (labkit)",
        "language": "python",
        # Plots must reach the notebook as image/png even when the caller set MPLBACKEND=Agg.
        "env": {"MPLBACKEND": "module://matplotlib_inline.backend_inline", **extra},
        "metadata": {"debugger": False},
    }
    spec_dir.mkdir(parents=True, exist_ok=True)
    target = spec_dir / "kernel.json"
    text = json.dumps(spec, indent=1)
    if not target.exists() or target.read_text() != text:
        target.write_text(text)
    paths = [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
    if str(spec_root) not in paths:
        os.environ["JUPYTER_PATH"] = os.pathsep.join([str(spec_root), *paths])
    return name
