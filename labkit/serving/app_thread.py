"""``AppThread``: an ASGI app served by uvicorn on a daemon thread of this process.

What notebooks and tests use to run a server beside the code that loads it: ``start()`` returns
once the port accepts connections, ``stop()`` asks uvicorn to exit and waits for the thread.
``labkit.serving.http.BackgroundServer`` (an ``InferenceService``) and
``labkit.bench.fake_server.FakeServer`` (a server of known timing) are the two users.
"""

from __future__ import annotations

import threading
import time


class AppThread:
    """Serve ``app`` on ``host:port`` (a free port when None) from a daemon thread named
    ``name-<port>``; ``uvicorn_options`` go to ``uvicorn.Config`` (log level warning unless
    given). ``with AppThread(app) as server: server.url``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, *,
                 name: str = "labkit-http", **uvicorn_options) -> None:
        import uvicorn

        from labkit.serving.redis_server import free_port

        self.host, self.port = host, port or free_port()
        config = uvicorn.Config(app, host=host, port=self.port,
                                **{"log_level": "warning", **uvicorn_options})
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True,
                                        name=f"{name}-{self.port}")

    @property
    def url(self) -> str:
        """The server root (``http://host:port``)."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0):
        """Start serving; returns this object once the port accepts connections, or raises
        RuntimeError naming the URL after ``timeout_s`` seconds."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url} within "
                                   f"{timeout_s} s (port in use?)")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask uvicorn to exit and wait for the thread (at most ``timeout_s`` seconds)."""
        self._server.should_exit = True
        self._thread.join(timeout_s)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
