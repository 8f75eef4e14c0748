"""The exact response cache: one model's answers by key, in Redis or an in-process LRU.

Keys come from ``labkit.serving.keys`` (sha256, equal in every process); where entries live is
``labkit.serving.cache_backends``; the caching lab's workloads and bench are in
``labkit.bench.caching``.

The interface (``AsyncCache``, what ``InferenceService`` uses)::

    key = cache.key(request)           # str, or None: not cacheable (computed once per request)
    value = await cache.get(key)       # the stored value dict, or None (a miss)
    stored = await cache.put(key, completion)   # False when the backend is down
    state = await cache.probe()        # "ok" or "degraded: reason" (GET /health)
    cache.counters                     # hits, misses, errors, outages, ... (GET /metrics)
    await cache.aclose()

``ResponseCache`` (sync) and ``AsyncResponseCache`` (the same with ``async def`` methods, on
``redis.asyncio``, for the serving lab) share one core: TTL, hit/miss counters
(``cache.counters``), lookup latency in seconds, values stored as JSON (text, token ids, finish
reason), never pickle. Requests with ``temperature > 0`` have no key unless
``cache_sampled=True``: caching a sample freezes it, and every later caller would get the same
"random" answer.

Fail open. If Redis goes away, a lookup is a miss and a store is skipped; one warning per outage
(not per call) and one line when it is back; after ``retry_after_s`` the next call tries Redis
again, so the cache comes back on its own when the server does (the embedded server is
restarted by ``labkit.serving.redis_server``; a ``$REDIS_URL`` server by whoever runs it).
``cache.state`` says which it is now: ``"ok"`` or ``"degraded: <the error>"``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Protocol

from labkit.engines.base import Completion, Request
from labkit.serving.cache_backends import backend_errors, make_backend
from labkit.serving.keys import cache_key, canonical_json, namespace

log = logging.getLogger(__name__)


class AsyncCache(Protocol):
    """What ``InferenceService`` needs of a response cache (``AsyncResponseCache`` is one)."""

    def key(self, request: Request) -> str | None:
        """The request's key, or None when the request must not be cached."""

    async def get(self, key: str) -> dict | None:
        """The value stored under ``key`` (``completion_value``'s dict), or None: a miss."""

    async def put(self, key: str, completion: Completion | dict) -> bool:
        """Store a completion under ``key``; True when it was stored."""

    async def probe(self) -> str:
        """``"ok"`` or ``"degraded: reason"``; while degraded, retries the backend."""

    @property
    def counters(self) -> CacheCounters:
        """Hits, misses, backend errors and outages."""

    async def aclose(self) -> None:
        """Release the backend's connections."""


@dataclass
class CacheCounters:
    """Counters of one cache. Latencies are lookup times in seconds (fetch + decode)."""

    hits: int = 0
    misses: int = 0
    skipped: int = 0  # not cacheable (sampled requests without cache_sampled): no key
    errors: int = 0  # backend calls that failed (each one answered as a miss / no store)
    outages: int = 0  # times the backend went from reachable to unreachable
    tokens_saved: int = 0  # output tokens served from the cache instead of generated
    hit_latency_s: list[float] = field(default_factory=list)
    miss_latency_s: list[float] = field(default_factory=list)

    @property
    def hit_ratio(self) -> float:
        """hits / (hits + misses); NaN before the first lookup."""
        n = self.hits + self.misses
        return self.hits / n if n else float("nan")


def completion_value(completion: Completion | dict) -> dict:
    """The JSON value stored for a completion: text, token ids, finish reason, prompt tokens."""
    if isinstance(completion, dict):
        return completion
    return {"text": completion.text, "token_ids": list(completion.token_ids),
            "finish_reason": completion.finish_reason, "prompt_tokens": completion.prompt_tokens}


def completion_from_value(request_id: str, value: dict, start_s: float, t_s: float) -> Completion:
    """A Completion rebuilt from a cached value: the whole answer arrives at once at ``t_s`` (the
    lookup's end), one stamp, so a hit's TTFT and E2E are the lookup latency and it has no TPOT or
    ITL (zeros there would drag a mixed run's decode statistics down)."""
    tokens = list(value.get("token_ids", []))
    return Completion(request_id, value["text"], tokens, int(value.get("prompt_tokens", 0)),
                      value.get("finish_reason", "stop"), start_s, [t_s] if tokens else [], t_s)


class _CacheCore:
    """What the sync and async caches share: keys, the cacheable rule, counters, fail-open state."""

    asynchronous = False  # which Redis client a backend name builds

    def __init__(self, model: str, backend="redis", *, url: str | None = None,
                 capacity: int | None = None, ttl_s: float | None = None, ns: str | None = None,
                 cache_sampled: bool = False, retry_after_s: float = 0.5) -> None:
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be None (no expiry) or > 0 seconds, got {ttl_s!r}")
        self.model, self.ttl_s, self.cache_sampled = model, ttl_s, cache_sampled
        self.namespace = ns or namespace(model)
        self.retry_after_s = retry_after_s
        self.counters = CacheCounters()
        self._down_since: float | None = None
        self._reason = ""  # the error of the current outage
        self._last_try = 0.0
        self.backend = make_backend(backend, url, capacity, asynchronous=self.asynchronous)

    def key(self, request: Request) -> str | None:
        """The request's key in this cache's namespace, or None (counted as ``skipped``) when it
        is not cacheable."""
        if not self.cacheable(request):
            self.counters.skipped += 1
            return None
        return cache_key(self.model, request, self.namespace)

    def cacheable(self, request: Request) -> bool:
        """Greedy requests always; sampled ones (temperature > 0) only with cache_sampled=True."""
        return request.greedy or self.cache_sampled

    def _skip_backend(self) -> bool:
        """During an outage, do not touch the backend until retry_after_s has passed."""
        return self._down_since is not None and time.monotonic() - self._last_try < \
            self.retry_after_s

    @property
    def state(self) -> str:
        """``"ok"``, or ``"degraded: <error>"`` during an outage (lookups answered as misses)."""
        return "ok" if self._down_since is None else f"degraded: {self._reason}"

    def _failed(self, exc: Exception) -> None:
        self.counters.errors += 1
        self._last_try = time.monotonic()
        if self._down_since is None:
            self._down_since = self._last_try
            self.counters.outages += 1
            self._reason = f"cache backend unreachable ({type(exc).__name__}: {exc})"
            msg = f"{self._reason}; serving misses"
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _ok(self) -> None:
        if self._down_since is not None:
            log.warning("cache backend reachable again after %.1f s",
                        time.monotonic() - self._down_since)
            self._down_since = None

    def _tally(self, raw: str | None, t0: float) -> dict | None:
        """Decode a fetched entry and count the lookup (started at ``t0``) as a hit or a miss."""
        dt = time.perf_counter() - t0
        if raw is None:
            self.counters.misses += 1
            self.counters.miss_latency_s.append(dt)
            return None
        try:
            value = json.loads(raw)
            if not isinstance(value, dict) or "text" not in value:
                raise ValueError(f"expected an object with 'text', got {type(value).__name__}")
        except ValueError as exc:  # a foreign or damaged entry: a miss, never a crash
            warnings.warn(f"ignoring an unreadable cache entry ({exc}); treated as a miss",
                          RuntimeWarning, stacklevel=3)
            self.counters.misses += 1
            self.counters.miss_latency_s.append(dt)
            return None
        self.counters.hits += 1
        self.counters.hit_latency_s.append(dt)
        self.counters.tokens_saved += len(value.get("token_ids", ()))
        return value

    def _encode(self, completion: Completion | dict) -> str:
        return canonical_json(completion_value(completion))

    @property
    def prefix(self) -> str:
        return f"labkit:{self.namespace}:"


class ResponseCache(_CacheCore):
    """Exact response cache for one model: ``key(request)``, ``get(key)`` -> value dict or None,
    ``put(key, completion)``.

    ``backend``: ``"redis"`` (``url`` or ``redis_url()``), ``"lru"`` (in-process, ``capacity``
    entries) or a backend object. ``ttl_s``: seconds an entry lives (None: forever).
    """

    def _reset(self) -> None:
        """Drop the backend's connections after a failure; a failure to do so changes nothing."""
        with contextlib.suppress(*backend_errors()):
            self.backend.reset()

    def get(self, key: str) -> dict | None:
        """The cached value, or None (miss, or backend down: fail open)."""
        t0 = time.perf_counter()
        raw = None
        if not self._skip_backend():
            try:
                raw = self.backend.get(key)
                self._ok()
            except backend_errors() as exc:
                self._failed(exc)
                self._reset()
        return self._tally(raw, t0)

    def put(self, key: str, completion: Completion | dict) -> bool:
        """Store a completion; False when the backend is down."""
        if self._skip_backend():
            return False
        try:
            self.backend.set(key, self._encode(completion), self.ttl_s)
            self._ok()
            return True
        except backend_errors() as exc:
            self._failed(exc)
            self._reset()
            return False

    def clear(self) -> int:
        """Delete this namespace's entries (other models' entries stay); returns how many."""
        return self.backend.clear(self.prefix)

    def ping(self) -> None:
        """Raise the backend's error (``backend_errors()``) if it cannot be reached now: a
        preflight, unlike ``get``/``put``, which fail open."""
        self.backend.ping()


class AsyncResponseCache(_CacheCore):
    """``ResponseCache`` with coroutine methods (``await cache.get(key)``), on redis.asyncio; an
    ``AsyncCache``."""

    asynchronous = True

    async def _call(self, fn, *args):
        out = fn(*args)
        return await out if inspect.isawaitable(out) else out  # the LRU backend is sync

    async def _reset(self) -> None:
        """Drop the backend's connections after a failure; a failure to do so changes nothing."""
        with contextlib.suppress(*backend_errors()):
            await self._call(self.backend.reset)

    async def get(self, key: str) -> dict | None:
        """The cached value, or None (miss, or backend down: fail open)."""
        t0 = time.perf_counter()
        raw = None
        if not self._skip_backend():
            try:
                raw = await self._call(self.backend.get, key)
                self._ok()
            except backend_errors() as exc:
                self._failed(exc)
                await self._reset()
        return self._tally(raw, t0)

    async def put(self, key: str, completion: Completion | dict) -> bool:
        """Store a completion; False when the backend is down."""
        if self._skip_backend():
            return False
        try:
            await self._call(self.backend.set, key, self._encode(completion), self.ttl_s)
            self._ok()
            return True
        except backend_errors() as exc:
            self._failed(exc)
            await self._reset()
            return False

    async def clear(self) -> int:
        """Delete this namespace's entries; returns how many."""
        return await self._call(self.backend.clear, self.prefix)

    async def probe(self) -> str:
        """``state``, after one PING when the backend is down and ``retry_after_s`` has passed
        (so an idle server notices that Redis came back)."""
        if self._down_since is not None and not self._skip_backend():
            try:
                await self._call(self.backend.ping)
                self._ok()
            except backend_errors() as exc:
                self._failed(exc)
                await self._reset()
        return self.state

    async def aclose(self) -> None:
        """Close the backend's connections."""
        await self._call(self.backend.close)
