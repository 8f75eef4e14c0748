"""One Ray Serve replica: an engine, an ``InferenceService`` and the OpenAI routes.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

REPLICA_HEADER = "x-labkit-replica"  # each response names the replica that served it


def board_key(app_name: str) -> str:
    """The Redis hash where each replica of ``app_name`` publishes its metrics (JSON per field)."""
    return f"labkit-serve:{app_name}:replicas"


class ServeBatchService:
    """``InferenceService``'s request path with Ray Serve's ``@serve.batch`` as the batcher.

    cache lookup -> ``serve.batch`` queue (``max_batch_size``, ``batch_wait_timeout_s``) -> one
    ``engine.generate(batch)`` in a worker thread -> cache store. It answers ``handle``,
    ``stream`` (the whole text as one event: ``serve.batch`` returns finished results),
    ``metrics`` and ``aclose`` like ``InferenceService``, so ``labkit.serving.http.create_app``
    serves it.
    Must be built inside a Serve replica (``serve.batch`` reads the replica's config).
    """

    def __init__(self, engine, cache=None, *, model_name: str | None = None,
                 max_batch_size: int = 16, max_wait_ms: float = 10.0) -> None:
        from ray import serve

        self.engine, self.cache = engine, cache
        self.model_name = model_name or engine.model_name
        self.max_batch_size, self.max_wait_ms = max_batch_size, max_wait_ms
        self.batch_sizes: list[int] = []
        self.counts = {"requests": 0, "completed": 0, "cache_hits": 0, "cache_misses": 0}
        self._latency_s: list[float] = []
        self._batched = serve.batch(max_batch_size=max_batch_size,
                                    batch_wait_timeout_s=max_wait_ms / 1000)(self._run_batch)

    async def _run_batch(self, requests: list) -> list:
        self.batch_sizes.append(len(requests))
        return await asyncio.to_thread(self.engine.generate, requests)

    async def handle(self, request, on_delta=None, *, use_cache: bool = True):
        from labkit.engines.base import now
        from labkit.serving.cache import completion_from_value
        from labkit.serving.service import ServiceResponse

        t0 = now()
        self.counts["requests"] += 1
        cache = self.cache if use_cache else None
        value = await cache.get(request) if cache is not None else None
        if value is not None:
            self.counts["cache_hits"] += 1
            completion = completion_from_value(request.request_id, value, t0, now())
            hit = True
        else:
            if cache is not None and cache.cacheable(request):
                self.counts["cache_misses"] += 1
            completion = await self._batched(request)
            if cache is not None:
                await cache.put(request, completion)
            hit = False
        end = now()
        self.counts["completed"] += 1
        self._latency_s.append(end - t0)
        if on_delta is not None and completion.text:
            on_delta(completion.text, end)
        return ServiceResponse(request.request_id, completion.text, completion, end - t0, hit)

    async def stream(self, request, *, use_cache: bool = True):
        from labkit.engines.base import now
        from labkit.serving.service import StreamEvent

        response = await self.handle(request, use_cache=use_cache)
        if response.text:
            yield StreamEvent(response.text, response.completion.end_s)
        yield StreamEvent("", now(), response)

    def metrics(self) -> dict:
        """Counters, cache hit ratio, Serve batch sizes and latency percentiles (s)."""
        from collections import Counter

        from labkit.metrics import stats

        n, looked = len(self.batch_sizes), self.counts["cache_hits"] + self.counts["cache_misses"]
        return {"model": self.model_name, "engine": getattr(self.engine, "name", "?"),
                **self.counts, "cache_enabled": self.cache is not None,
                "cache_hit_ratio": self.counts["cache_hits"] / looked if looked else None,
                "batching": {"mode": "serve.batch", "max_batch_size": self.max_batch_size,
                             "max_wait_ms": self.max_wait_ms, "batches": n,
                             "requests": sum(self.batch_sizes),
                             "mean_batch_size": sum(self.batch_sizes) / n if n else 0.0,
                             "batch_size_counts": dict(sorted(Counter(self.batch_sizes).items()))},
                "latency_s": stats(self._latency_s)}

    async def aclose(self) -> None:
        closer = getattr(self.cache, "aclose", None)
        if closer is not None:
            await closer()


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
    """One Serve replica: an engine, a service (labkit or Serve batcher), the OpenAI routes."""

    def __init__(self, model: str, engine, redis_url: str | None, cache: bool, batcher: str,
                 max_batch_size: int, max_wait_ms: float, max_queue: int, torch_threads: int | None,
                 engine_kwargs: dict) -> None:
        from ray import serve

        from labkit.serving.http import build_service

        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.model, self.redis_url = model, redis_url
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.app_name = serve.get_replica_context().app_name
        eng = engine() if callable(engine) else engine
        if batcher == "labkit":
            self.service = build_service(eng, model, cache, redis_url=redis_url,
                                         max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                                         max_queue=max_queue, **engine_kwargs)
        else:
            from labkit.engines import get_engine
            from labkit.serving.cache import AsyncResponseCache

            if isinstance(eng, str):
                eng = get_engine(eng, model=model, **engine_kwargs)
            eng.warmup()
            self.service = ServeBatchService(
                eng, AsyncResponseCache(model, "redis", url=redis_url) if cache else None,
                model_name=model, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
        self._board = None

    async def publish(self) -> None:
        """Write this replica's metrics (and pid) to the Redis board; never fails a request."""
        if self.redis_url is None:
            return
        if self._board is None:
            from labkit.serving.redis_server import get_client

            self._board = get_client(self.redis_url, asyncio=True)
        record = {**self.service.metrics(), "replica": self.replica, "pid": os.getpid(),
                  "published_unix_s": time.time()}
        try:
            await self._board.hset(board_key(self.app_name), self.replica, json.dumps(record))
        except Exception:  # noqa: BLE001 (metrics are best effort; the answer still goes out)
            pass

    async def __serve_build_asgi_app__(self):
        from labkit.serving.http import create_app

        app = create_app(self.service, self.model)
        app.add_middleware(_ReplicaTag, replica=self.replica, publish=self.publish)
        await self.publish()
        return app
