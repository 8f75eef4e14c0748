"""Jupyter kernels for headless runs (``labkit run``, ``labkit grade``) and where state lives.

``prepare_kernel`` registers a kernel spec that runs *this* Python (``sys.executable``), with
optional extra environment (a GPU to see, the grader's mark), in a project-local or temporary
Jupyter dir, so a run works as root, with a read-only home and without a system-wide Jupyter
install; ``remove_kernel`` deletes a spec made for one run. ``state_dir`` is where Jupyter,
IPython and matplotlib keep their state meanwhile.

``local_kernel`` is the kernel manager of an unboxed run: IPC sockets in a fresh private temp
folder instead of TCP on the loopback (which ipykernel warns about once per kernel, and which any
local user can connect to).

``sandboxed_kernel`` is the grader's: a spec whose argv is the sandbox
(``labkit.course.sandbox.command``) around ``python -m ipykernel_launcher -f {connection_file}``,
and a kernel manager for papermill that talks to it over IPC sockets in the box's runtime
folder (the sandbox has a network of its own, so TCP on the loopback would not reach it).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from labkit.config import PROJECT_ROOT, in_repository, labkit_home
from labkit.course.sandbox import Box, Limits, command, lock_runtime

# Plots must reach the notebook as image/png even when the caller set MPLBACKEND=Agg.
PLOT_BACKEND = "module://matplotlib_inline.backend_inline"


def state_dir() -> Path:
    """Where Jupyter/IPython/matplotlib state goes: ``<project>/.cache`` in the repository,
    ``<LABKIT_HOME>/state`` in an installed wheel (never site-packages), if writable; else temp."""
    root = PROJECT_ROOT / ".cache" if in_repository() else labkit_home() / "state"
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
    _state_env()
    extra = dict(env or {})
    tag = sys.executable + (json.dumps(extra, sort_keys=True) if extra else "")
    name = "labkit-py-" + hashlib.sha256(tag.encode()).hexdigest()[:8]
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    return _write_spec(name, argv, {"MPLBACKEND": PLOT_BACKEND, **extra})


def _state_env() -> None:
    """JUPYTER_*/IPYTHONDIR/MPLCONFIGDIR of this process: where unset, dirs of ``state_dir``."""
    base = state_dir()
    for var, sub in [("JUPYTER_CONFIG_DIR", "jupyter/config"), ("JUPYTER_DATA_DIR", "jupyter/data"),
                     ("JUPYTER_RUNTIME_DIR", "jupyter/runtime"), ("IPYTHONDIR", "ipython"),
                     ("MPLCONFIGDIR", "matplotlib")]:
        if not os.environ.get(var):
            os.environ[var] = str(base / sub)
        Path(os.environ[var]).mkdir(parents=True, exist_ok=True)


def _write_spec(name: str, argv: list[str], env: Mapping[str, str]) -> str:
    """Write ``kernels/<name>/kernel.json`` under the JUPYTER_PATH dir of ``_kernel_specs``."""
    spec_root = _kernel_specs()
    spec_dir = spec_root / "kernels" / name
    spec = {
        "argv": argv,
        "display_name": f"Python {platform.python_version()} (labkit)",
        "language": "python",
        "env": dict(env),
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


def sandboxed_kernel(box: Box, limits: Limits, env: Mapping[str, str] | None = None,
                     hidden: Sequence[Path] = ()):
    """A kernel spec that starts ipykernel in ``box`` under ``limits`` (``env``: extra variables;
    ``hidden``: paths the sandbox must not show) and a kernel manager to hand to papermill.

    The manager uses IPC sockets in ``box.runtime``, makes the connection file readable by the
    box's user, and takes the runtime folder back from it once the kernel is ready
    (``lock_runtime``). Returns ``(name, manager)``; afterwards ``stop_kernel(manager)`` and
    ``remove_kernel(name)``.
    """
    _state_env()
    name = f"labkit-box-{box.root.name}-{os.getpid()}"
    inner = {"MPLBACKEND": PLOT_BACKEND, **(env or {})}
    argv = command(box, [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                   limits, inner, hidden)
    _write_spec(name, argv, inner)
    return name, _box_manager()(box, kernel_name=name, transport="ipc",
                                connection_file=str(box.runtime / "kernel.json"))


SOCKET_PATH_MAX = 100  # bytes; a Unix socket path must fit in sun_path (108 with the NUL)


@contextlib.contextmanager
def local_kernel(name: str):
    """A kernel manager (for papermill) of kernel spec ``name`` that talks to its kernel over IPC
    sockets in a new 0700 temp folder; on leaving, the kernel is stopped and the folder removed.

    The sockets are ``<folder>/k-<n>``: the folder comes from ``tempfile.mkdtemp`` (``/tmp``
    when ``TMPDIR`` is too deep for a socket path), never from the Jupyter runtime dir, whose
    project-local path can pass the kernel's 107-byte limit.
    """
    from jupyter_client.manager import AsyncKernelManager

    from labkit.processes import best_effort

    base = tempfile.gettempdir()
    if len(os.path.join(base, "lk-xxxxxxxx", "k-00000")) > SOCKET_PATH_MAX:
        base = "/tmp"
    folder = Path(tempfile.mkdtemp(prefix="lk-", dir=base))
    manager = AsyncKernelManager(kernel_name=name, transport="ipc", ip=str(folder / "k"),
                                 connection_file=str(folder / "kernel.json"))
    try:
        yield manager
    finally:
        best_effort(lambda: stop_kernel(manager))
        shutil.rmtree(folder, ignore_errors=True)


def stop_kernel(manager) -> None:
    """Kill the kernel of a manager handed to papermill (which leaves running a kernel whose
    manager it did not create), with everything in its box's PID namespace."""
    import asyncio

    if manager.has_kernel:
        asyncio.run(manager.shutdown_kernel(now=True))


@functools.cache
def _box_manager():
    """The kernel manager class of boxed kernels (jupyter_client imported on first use)."""
    from jupyter_client.asynchronous.client import AsyncKernelClient
    from jupyter_client.manager import AsyncKernelManager

    class BoxClient(AsyncKernelClient):
        box: Box | None = None

        async def wait_for_ready(self, timeout: float | None = None) -> None:
            await super().wait_for_ready(timeout)
            lock_runtime(self.box)  # the sockets exist now; no student code ran yet

    class BoxKernelManager(AsyncKernelManager):
        def __init__(self, box: Box, **kwargs) -> None:
            super().__init__(client_factory=BoxClient, **kwargs)
            self.box = box

        def write_connection_file(self, **kwargs) -> None:
            super().write_connection_file(**kwargs)
            if self.box.uid is not None:
                os.chown(self.connection_file, self.box.uid, self.box.uid)

        def client(self, **kwargs) -> BoxClient:
            kc = super().client(**kwargs)
            kc.box = self.box
            return kc

    return BoxKernelManager
