"""One Ray Serve replica: an engine, the same ``InferenceService`` as everywhere, the OpenAI
routes.

``deploy`` (``labkit.serving.deploy``) runs ``LabkitReplica`` as a Serve deployment. Each
replica builds its service with ``labkit.serving.build.build_service``: labkit's batcher
(``batcher="labkit"``: ``DynamicBatcher`` or, for a continuous engine, ``ContinuousGate``) or
Serve's (``batcher="serve"``: ``labkit.serving.serve_batcher.ServeBatcher``); either way the
request path and ``service.metrics()`` are the ones of ``labkit.serving.service``. Each response
carries ``x-labkit-replica``; after each one the replica publishes its metrics to a Redis hash
(``board_key``) that ``ServeDeployment.replica_metrics()`` reads.
"""

from __future__ import annotations

import functools
import json
import os
import time

from labkit.config import MAX_BODY_BYTES
from labkit.serving.build import build_service
from labkit.serving.http import create_app
from labkit.serving.redis_server import get_client
from labkit.serving.serve_batcher import ServeBatcher
from labkit.serving.service import DEADLINE_S

REPLICA_HEADER = "x-labkit-replica"  # each response names the replica that served it


def board_key(app_name: str) -> str:
    """The Redis hash where each replica of ``app_name`` publishes its metrics (JSON per field)."""
    return f"labkit-serve:{app_name}:replicas"


class _ReplicaTag:
    """ASGI middleware: add ``x-labkit-replica`` to every response and publish the replica's
    metrics to Redis before the last body chunk leaves (so a client that got its answer reads
    up-to-date counters)."""

    def __init__(self, app, replica, publish) -> None:
        self.app, self.replica, self.publish = app, replica, publish

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (REPLICA_HEADER.encode(), self.replica.encode())]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                await self.publish()
            await send(message)

        await self.app(scope, receive, tagged)


class LabkitReplica:
    """One Serve replica: an engine, a service (labkit's or Serve's batcher), the OpenAI routes.

    ``engine``: a ``get_engine`` name, an Engine, or a zero-argument factory of either.
    """

    def __init__(self, model: str, engine, redis_url: str | None, cache: bool, batcher: str,
                 max_batch_size: int, max_wait_ms: float, max_queue: int, torch_threads: int | None,
                 engine_kwargs: dict, deadline_s: float | None = DEADLINE_S,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        from ray import serve

        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.model, self.redis_url = model, redis_url
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.app_name = serve.get_replica_context().app_name
        serve_batcher = functools.partial(ServeBatcher, max_batch_size=max_batch_size,
                                          max_wait_ms=max_wait_ms)
        self.service = build_service(engine() if callable(engine) else engine, model, cache,
                                     redis_url=redis_url,
                                     batcher=serve_batcher if batcher == "serve" else None,
                                     max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                                     max_queue=max_queue, deadline_s=deadline_s, **engine_kwargs)
        self.max_body_bytes = max_body_bytes
        self._board = None

    async def publish(self) -> None:
        """Write this replica's metrics (and pid) to the Redis board; never fails a request."""
        if self.redis_url is None:
            return
        if self._board is None:
            self._board = get_client(self.redis_url, asyncio=True)
        published = {**self.service.metrics(), "replica": self.replica, "pid": os.getpid(),
                     "published_unix_s": time.time()}
        try:
            await self._board.hset(board_key(self.app_name), self.replica, json.dumps(published))
        except Exception:  # noqa: BLE001 (metrics are best effort; the answer still goes out)
            pass

    async def __serve_build_asgi_app__(self):
        app = create_app(self.service, self.model, max_body_bytes=self.max_body_bytes)
        app.add_middleware(_ReplicaTag, replica=self.replica, publish=self.publish)
        await self.publish()
        return app
