"""``ProcessEngine``: any engine in a process of its own, so its step loop keeps its own GIL.

In one process, a server's event loop (HTTP parsing, one SSE chunk and its JSON per token per
stream, socket writes) and an engine's step loop (vLLM's scheduler and detokenizer are Python)
take turns on one GIL: every millisecond the front end holds it is a millisecond the next step
waits. ``ProcessEngine(name, model, **kwargs)`` builds ``get_engine(name, model, **kwargs)`` in a
child (``python -m labkit.engines.process``: a fresh interpreter, which neither copies the
parent's CUDA state and threads, as fork would, nor re-runs the parent's script, as
multiprocessing's spawn does) and forwards ``generate`` to it over one socket pair::

    parent                                           child
    generate(requests, on_token) --("run", id, requests, streams)--> a thread: engine.generate
    Request.cancel() (seen within CANCEL_POLL_S) --("cancel", id, rows)--> request.cancel()
                   <--("batch", [token and done events, in order])-- one message per burst

The child's tokens leave in bursts (all that came while the last message was being sent), so a
step of 256 streams costs one pipe message, and the parent's receiver thread hands each token to
its caller's ``on_token``. Timestamps are the child's ``perf_counter``: one monotonic clock for
every process on Linux. Deadlines travel in the requests; the child enforces them itself.
Messages are ``multiprocessing.connection`` objects on a socket pair that only these two
processes hold; a child's error crosses as (type name, message, param, code) and is raised again
in the parent as ``InvalidRequest``, CUDA OOM or a RuntimeError naming it.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from labkit.engines.base import Completion, Engine, InvalidRequest, Request, TokenCallback
from labkit.processes import stop_process

START_TIMEOUT_S = 900.0  # how long the child may take to build its engine (vLLM: compile, graphs)
CANCEL_POLL_S = 0.01  # how often the parent looks for cancelled requests (s)
CLOSE_TIMEOUT_S = 30.0  # how long close() waits for the child to free its engine (s)


class EngineProcessError(RuntimeError):
    """The engine's process failed to start or died; its message says how."""


@dataclass
class _Call:
    requests: list[Request]
    on_token: TokenCallback | None
    done: threading.Event = field(default_factory=threading.Event)
    result: list[Completion] | None = None
    error: BaseException | None = None
    cancel_sent: set[int] = field(default_factory=set)


class ProcessEngine(Engine):
    """``get_engine(name, model, **kwargs)`` run in a child process (see module doc).

    ``env``: variables added to the child's environment, in place before it imports anything
    (settings a library reads once at import, such as vLLM's ``VLLM_BATCH_INVARIANT``)."""

    def __init__(self, name: str, model: str, *, env: Mapping[str, str] | None = None,
                 **kwargs) -> None:
        from labkit.engines.registry import resolve_engine
        from labkit.models import load_tokenizer, resolve

        super().__init__(model, None, kwargs.get("dtype", "auto"))
        self.inner = resolve_engine(name)
        self.name = self.inner  # benches and metrics name the engine that generates
        self.tokenizer = load_tokenizer(resolve(model))
        ours, theirs = socket.socketpair()
        with theirs:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "labkit.engines.process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env={**os.environ, **env} if env else None)
        self._conn = Connection(ours.detach())
        weakref.finalize(self, stop_process, self._proc, 0)  # also at interpreter exit
        self._conn.send((self.inner, model, kwargs))
        info = self._startup()
        self.continuous, self.max_model_len = info["continuous"], info["max_model_len"]
        self.device_label = info["device"]  # what ``engine_device`` reports
        self.pid = self._proc.pid
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self._closed = threading.Event()
        self._dead: BaseException | None = None
        self._receiver = threading.Thread(target=self._receive, daemon=True,
                                          name=f"{self.inner}-process-receiver")
        self._receiver.start()

    def _startup(self) -> dict:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._conn.poll(1.0):
            if self._proc.poll() is not None:
                raise EngineProcessError(f"the {self.inner} engine's process exited with code "
                                         f"{self._proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                stop_process(self._proc, 0)
                raise EngineProcessError(f"the {self.inner} engine's process was not ready "
                                         f"after {START_TIMEOUT_S:g} s")
        kind, payload = self._conn.recv()
        if kind == "failed":
            stop_process(self._proc, 10, terminate=False)  # it exits on its own
            raise EngineProcessError(f"the {self.inner} engine failed to start in its process: "
                                     f"{payload}")
        return payload

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._conn.send(message)

    def generate(self, requests: Sequence[Request],
                 on_token: TokenCallback | None = None) -> list[Completion]:
        """Run ``requests`` in the child's engine; ``on_token`` is called on the parent's
        receiver thread with the child's timestamps."""
        if self._dead is not None or self._closed.is_set():
            raise EngineProcessError(f"the {self.inner} engine's process is gone: "
                                     f"{self._dead or 'closed'}")
        call, cid = _Call(list(requests), on_token), next(self._ids)
        self._calls[cid] = call
        try:
            self._send(("run", cid, call.requests, on_token is not None))
        except (OSError, ValueError) as err:
            self._calls.pop(cid, None)
            raise EngineProcessError(f"cannot reach the {self.inner} engine's process: "
                                     f"{err}") from err
        while not call.done.wait(1.0):  # a child that died as this call was made: no hang
            if not self._receiver.is_alive():
                self._calls.pop(cid, None)
                raise self._dead or EngineProcessError(f"the {self.inner} engine's process "
                                                       f"was closed during the call")
        if call.error is not None:
            raise call.error
        return call.result

    def _receive(self) -> None:
        """Dispatch the child's events; send cancellations; fail every caller if it dies."""
        try:
            while not self._closed.is_set():
                if self._conn.poll(CANCEL_POLL_S):
                    kind, events = self._conn.recv()
                    for event in events:
                        self._dispatch(event)
                self._send_cancels()
        except (EOFError, OSError) as err:
            self._dead = EngineProcessError(f"the {self.inner} engine's process exited (code "
                                            f"{self._proc.poll()}): {type(err).__name__}")
        finally:
            for call in list(self._calls.values()):
                call.error = self._dead or EngineProcessError("the engine process was closed")
                call.done.set()
            self._calls.clear()

    def _dispatch(self, event: tuple) -> None:
        cid = event[1]
        call = self._calls.get(cid)
        if call is None:
            return
        if event[0] == "token":
            _, _, i, tok, delta, t = event
            if call.on_token is not None:
                call.on_token(i, tok, delta, t)
        else:  # ("done", cid, completions, error)
            del self._calls[cid]
            call.result = event[2]
            call.error = _rebuilt(*event[3]) if event[3] is not None else None
            call.done.set()

    def _send_cancels(self) -> None:
        for cid, call in list(self._calls.items()):
            rows = [i for i, r in enumerate(call.requests) if r.cancelled
                    and i not in call.cancel_sent]
            if rows:
                call.cancel_sent.update(rows)
                self._send(("cancel", cid, rows))

    def close(self) -> None:
        """Ask the child to close its engine (freeing its GPU memory) and exit; kill it if it
        has not within ``CLOSE_TIMEOUT_S``."""
        if self._closed.is_set():
            return
        try:
            self._send(("close",))
        except (OSError, ValueError):
            pass
        stop_process(self._proc, CLOSE_TIMEOUT_S, terminate=False)  # asked to close
        self._closed.set()
        self._receiver.join(5)
        self._conn.close()


class _Outbox:
    """The child's side of the pipe: events queued from any thread, sent in bursts by one."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self._events: list[tuple] = []
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="outbox")
        self._thread.start()

    def put(self, event: tuple) -> None:
        with self._ready:
            self._events.append(event)
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._events and not self._closed:
                    self._ready.wait()
                events, self._events = self._events, []
                if not events and self._closed:
                    return
            self.conn.send(("batch", events))

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(10)


def _child_main(conn, name: str, model: str, kwargs: dict) -> None:
    """The child: build the engine, then run each ``run`` on its own thread until ``close``."""
    from labkit.engines.registry import engine_device, get_engine

    try:
        engine = get_engine(name, model, **kwargs)
    except BaseException as err:  # noqa: BLE001 (the parent reports it; nothing else can)
        conn.send(("failed", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", {"continuous": engine.continuous, "max_model_len": engine.max_model_len,
                         "device": engine_device(engine)}))
    outbox = _Outbox(conn)
    calls: dict[int, list[Request]] = {}
    # Continuous engines take many callers at once; a static engine runs one batch at a time.
    pool = concurrent.futures.ThreadPoolExecutor(1024 if engine.continuous else 1,
                                                 thread_name_prefix="call")

    def run(cid: int, requests: list[Request], streams: bool) -> None:
        def on_token(i: int, tok: int, delta: str, t: float) -> None:
            outbox.put(("token", cid, i, tok, delta, t))

        try:
            result = engine.generate(requests, on_token if streams else None)
            outbox.put(("done", cid, result, None))
        except BaseException as err:  # noqa: BLE001 (the caller in the parent raises it)
            outbox.put(("done", cid, None, _portable(err)))
        finally:
            calls.pop(cid, None)

    try:
        while True:
            message = conn.recv()
            if message[0] == "run":
                _, cid, requests, streams = message
                calls[cid] = requests
                pool.submit(run, cid, requests, streams)
            elif message[0] == "cancel":
                for i in message[2]:
                    if message[1] in calls:
                        calls[message[1]][i].cancel()
            else:  # close
                break
    except EOFError:  # the parent is gone
        pass
    finally:
        for requests in list(calls.values()):
            for request in requests:
                request.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        outbox.close()
        engine.close()


def _portable(err: BaseException) -> tuple:
    """What the parent needs to raise ``err`` again: its type's name, message, param, code."""
    return (type(err).__name__, str(err), getattr(err, "param", None), getattr(err, "code", None))


def _rebuilt(name: str, message: str, param: str | None, code: str | None) -> BaseException:
    """The parent's copy of a child's error: a refused request stays ``InvalidRequest`` (the
    server's 400) and CUDA OOM stays ``torch.cuda.OutOfMemoryError`` (the batching sweep records
    it); anything else is a RuntimeError that names the child's type."""
    if name == "InvalidRequest":
        return InvalidRequest(message, param, code)
    if name == "OutOfMemoryError":
        import torch

        return torch.cuda.OutOfMemoryError(message)
    return RuntimeError(f"{name} in the engine's process: {message}")


if __name__ == "__main__":  # the child: python -m labkit.engines.process FD
    _conn = Connection(int(sys.argv[1]))
    _child_main(_conn, *_conn.recv())
