"""Child processes that never outlive this one (the embedded Redis of ``redis_server``).

- On Linux a child is started with ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` (``die_with_parent``):
  the kernel sends it SIGTERM when we die, even by SIGKILL. PDEATHSIG fires when the *thread*
  that forked the child ends, so every such child is spawned from one long-lived ``keeper``
  thread, never from a short-lived worker thread (asyncio.to_thread, a pool).
- Elsewhere, ``WATCHDOG`` is a tiny Python process that waits on a pipe from us and kills the
  child's process group at EOF.
- A folder whose owner was killed before it could remove it is swept by the next start
  (``sweep_stale_dirs``).
"""

from __future__ import annotations

import ctypes
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """preexec_fn (runs in the child before exec): SIGTERM me when my parent dies (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def sweep_stale_dirs(pattern: str) -> None:
    """Remove the temp folders matching ``pattern`` whose owner (``owner.pid`` in them) was
    killed, so no atexit ran to remove them."""
    for folder in Path(tempfile.gettempdir()).glob(pattern):
        try:
            os.kill(int((folder / "owner.pid").read_text()), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (OSError, ValueError):  # no owner file yet, or not ours to judge
            continue


class _Keeper:
    """One daemon thread that lives as long as the process and runs every Popen (see module doc)."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="labkit-redis-keeper",
                                                daemon=True)
                self._thread.start()
        done: queue.Queue = queue.Queue(maxsize=1)
        self._jobs.put((args, kwargs, done))
        ok, result = done.get()
        if not ok:
            raise result
        return result

    def _run(self) -> None:
        while True:
            args, kwargs, done = self._jobs.get()
            try:
                done.put((True, subprocess.Popen(*args, **kwargs)))
            except BaseException as exc:  # handed back to the caller's thread
                done.put((False, exc))


keeper = _Keeper()

WATCHDOG = ("import os,signal,sys\n"
             "sys.stdin.buffer.read()\n"  # returns at EOF: our parent (the labkit process) died
             "try: os.killpg(int(sys.argv[1]), signal.SIGTERM)\n"
             "except ProcessLookupError: pass\n")
