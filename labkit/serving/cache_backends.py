"""Where the exact cache keeps its entries: an in-process LRU dict, or Redis (sync or asyncio).

Every backend stores strings (the cache's JSON values) under string keys and answers
``get(key) -> str | None``, ``set(key, value, ttl_s)``, ``clear(prefix) -> int`` (entries
deleted), ``ping()`` (raises when the store cannot be reached), ``reset()`` (drop connections
that may be stale after a failure) and ``close()``; the asyncio Redis backend's methods are
coroutines. ``make_backend``
builds one from a name in ``BACKENDS``. ``backend_errors()`` are the failures the cache answers
as a miss (fail open) instead of failing the request.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable

BACKENDS = ("redis", "lru")


class LRUBackend:
    """In-process LRU dict with optional ``capacity`` (entries) and per-entry TTL (seconds).

    ``clock`` (default ``time.monotonic``) can be a simulated clock, for TTL experiments.
    """

    def __init__(self, capacity: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be None (unbounded) or >= 1, got {capacity!r}")
        self.capacity, self.clock = capacity, clock
        self._data: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()

    def get(self, key: str) -> str | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] <= self.clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return item[0]

    def set(self, key: str, value: str, ttl_s: float | None) -> None:
        self._data[key] = (value, self.clock() + ttl_s if ttl_s else float("inf"))
        self._data.move_to_end(key)
        if self.capacity is not None and len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def clear(self, prefix: str) -> int:
        doomed = [k for k in self._data if k.startswith(prefix)]
        for k in doomed:
            del self._data[k]
        return len(doomed)

    def ping(self) -> None:
        """Always reachable: the entries are in this process."""

    def reset(self) -> None:
        """No connections to drop."""

    def close(self) -> None:
        """Nothing to release: the entries live as long as this object."""

    def __len__(self) -> int:
        return len(self._data)


class RedisBackend:
    """Strings in Redis: ``SET key json PX ttl``; ``clear`` SCANs and deletes one namespace.

    The client does not retry a failed command: the cache answers it as a miss at once and
    counts it, so even a Redis that is back a moment later (a restarted embedded server, with
    none of its entries) shows as an outage in the cache's counters and state.
    """

    def __init__(self, url: str | None = None, client=None) -> None:
        from labkit.serving.redis_server import get_client

        self.client = client or get_client(url, retries=0)

    def get(self, key: str) -> str | None:
        value = self.client.get(key)
        return value.decode() if isinstance(value, bytes) else value

    def set(self, key: str, value: str, ttl_s: float | None) -> None:
        self.client.set(key, value, px=_ttl_ms(ttl_s))

    def clear(self, prefix: str) -> int:
        keys = list(self.client.scan_iter(match=prefix + "*", count=1000))
        return self.client.delete(*keys) if keys else 0

    def ping(self) -> None:
        """PING the server; raises its error (connection refused, wrong password, ...)."""
        self.client.ping()

    def reset(self) -> None:
        """Close every pooled connection: after a failure (a restarted server) they are stale,
        and each would otherwise fail once more when next used."""
        self.client.connection_pool.disconnect()

    def close(self) -> None:
        """Close the client's connections."""
        self.client.close()


class AsyncRedisBackend(RedisBackend):
    """The same on ``redis.asyncio`` (every method is a coroutine)."""

    def __init__(self, url: str | None = None, client=None) -> None:
        from labkit.serving.redis_server import get_client

        self.client = client or get_client(url, asyncio=True, retries=0)

    async def get(self, key: str) -> str | None:
        value = await self.client.get(key)
        return value.decode() if isinstance(value, bytes) else value

    async def set(self, key: str, value: str, ttl_s: float | None) -> None:
        await self.client.set(key, value, px=_ttl_ms(ttl_s))

    async def clear(self, prefix: str) -> int:
        keys = [k async for k in self.client.scan_iter(match=prefix + "*", count=1000)]
        return await self.client.delete(*keys) if keys else 0

    async def ping(self) -> None:
        """PING the server; raises its error (connection refused, wrong password, ...)."""
        await self.client.ping()

    async def reset(self) -> None:
        """Close every pooled connection (see ``RedisBackend.reset``)."""
        await self.client.connection_pool.disconnect()

    async def close(self) -> None:
        """Close the client's connections."""
        await self.client.aclose()


def _ttl_ms(ttl_s: float | None) -> int | None:
    """Redis's PX argument: whole milliseconds, at least 1 (PX 0 is an error)."""
    return max(1, math.ceil(ttl_s * 1000)) if ttl_s else None


def make_backend(backend, url: str | None, capacity: int | None, *, asynchronous: bool):
    """A backend from its name (``"lru"``, ``"redis"``: asyncio Redis when ``asynchronous``);
    a backend object is returned as it is."""
    if not isinstance(backend, str):
        return backend
    if backend == "lru":
        return LRUBackend(capacity)
    if backend == "redis":
        return AsyncRedisBackend(url) if asynchronous else RedisBackend(url)
    raise ValueError(f"unknown cache backend {backend!r}; choose one of: {', '.join(BACKENDS)}")


def backend_errors() -> tuple[type[Exception], ...]:
    """The exceptions a backend call may raise that the cache answers as a miss / no store."""
    import redis

    # Every Redis error, not just a lost connection: a READONLY replica or an OOM refusal must
    # not fail the request either.
    return (redis.RedisError, OSError)
