"""Response caching: stable keys and an exact cache (Redis or in-process LRU); the workloads and
the bench are in ``labkit.bench.caching``.

Keys. ``cache_key`` is the sha256 of the canonical JSON (``sort_keys=True``, no spaces) of the
model id, the prompt or messages, and every sampling parameter that changes the output. The same
request gives the same key in every process and on every machine. Python's ``hash()`` does not:
it is salted per process (``PYTHONHASHSEED``), so a ``hash()`` key written by one worker is never
found by another. Layout: ``labkit:{namespace(model)}:{sha256}``, one namespace per model.

Caches. ``ResponseCache`` (sync) and ``AsyncResponseCache`` (the same API with ``async def``
methods, on ``redis.asyncio``, for the serving lab) share one core: TTL, hit/miss counters, hit
lookup latency in seconds, values stored as JSON (text, token ids, finish reason), never pickle.
Requests with ``temperature > 0`` are not cached unless ``cache_sampled=True``: caching a sample
freezes it, and every later caller would get the same "random" answer.

Fail open. If Redis goes away, a lookup is a miss and a store is skipped; one warning per outage
(not per call); after ``retry_after_s`` the next call tries Redis again, so the cache comes back
on its own when the server does.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from labkit.engines.base import Completion, Request

log = logging.getLogger(__name__)

BACKENDS = ("redis", "lru")


# -- keys ------------------------------------------------------------------------------------
def canonical_json(obj) -> str:
    """The one JSON text of ``obj``: sorted keys, no spaces, UTF-8 kept as is."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def key_payload(model: str, request: Request) -> dict:
    """What identifies a response: model id, prompt or messages, output-changing sampling params.

    Numbers are normalised (``temperature=0`` and ``0.0`` are one key) and stop strings sorted.
    """
    return {
        "model": model,
        "prompt": request.prompt,
        "messages": request.messages,
        "max_tokens": int(request.max_tokens),
        "temperature": float(request.temperature),
        "top_p": float(request.top_p),
        "seed": request.seed,
        "stop": sorted(request.stop) if request.stop else None,
        "ignore_eos": bool(request.ignore_eos),
    }


def namespace(model: str) -> str:
    """Key namespace of a model id: ``meta-llama/Llama-3.1-8B`` -> ``meta-llama_Llama-3.1-8B``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", model)


def cache_key(model: str, request: Request, ns: str | None = None) -> str:
    """``labkit:{namespace}:{sha256 of canonical_json(key_payload(model, request))}``."""
    digest = hashlib.sha256(canonical_json(key_payload(model, request)).encode()).hexdigest()
    return f"labkit:{ns or namespace(model)}:{digest}"


def eval_in_fresh_process(code: str, expr: str, *, pythonhashseed: int | str) -> str:
    """Run ``code`` in a new Python process with ``PYTHONHASHSEED`` set; return ``str(expr)``.

    Shows what another worker would compute: ``hash()`` differs, a sha256 key does not.
    """
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONHASHSEED": str(pythonhashseed)}
    script = f"{code}\nprint({expr})"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=60)
    if done.returncode:
        raise RuntimeError(f"fresh process failed ({done.returncode}): {done.stderr[-800:]}")
    return done.stdout.strip()


# -- backends --------------------------------------------------------------------------------
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

    def __len__(self) -> int:
        return len(self._data)


class RedisBackend:
    """Strings in Redis: ``SET key json PX ttl``; ``clear`` SCANs and deletes one namespace."""

    def __init__(self, url: str | None = None, client=None) -> None:
        from labkit.serving.redis_server import get_client

        self.client = client or get_client(url)

    def get(self, key: str) -> str | None:
        value = self.client.get(key)
        return value.decode() if isinstance(value, bytes) else value

    def set(self, key: str, value: str, ttl_s: float | None) -> None:
        self.client.set(key, value, px=_ttl_ms(ttl_s))

    def clear(self, prefix: str) -> int:
        keys = list(self.client.scan_iter(match=prefix + "*", count=1000))
        return self.client.delete(*keys) if keys else 0


def _ttl_ms(ttl_s: float | None) -> int | None:
    """Redis's PX argument: whole milliseconds, at least 1 (PX 0 is an error)."""
    return max(1, math.ceil(ttl_s * 1000)) if ttl_s else None


class AsyncRedisBackend(RedisBackend):
    """The same on ``redis.asyncio`` (every method is a coroutine)."""

    def __init__(self, url: str | None = None, client=None) -> None:
        from labkit.serving.redis_server import get_client

        self.client = client or get_client(url, asyncio=True)

    async def get(self, key: str) -> str | None:
        value = await self.client.get(key)
        return value.decode() if isinstance(value, bytes) else value

    async def set(self, key: str, value: str, ttl_s: float | None) -> None:
        await self.client.set(key, value, px=_ttl_ms(ttl_s))

    async def clear(self, prefix: str) -> int:
        keys = [k async for k in self.client.scan_iter(match=prefix + "*", count=1000)]
        return await self.client.delete(*keys) if keys else 0


# -- the cache -------------------------------------------------------------------------------
@dataclass
class CacheStats:
    """Counters of one cache. Latencies are lookup times in seconds (key + fetch + decode)."""

    hits: int = 0
    misses: int = 0
    skipped: int = 0  # not cacheable (sampled requests without cache_sampled)
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
    """What the sync and async caches share: keys, the cacheable rule, stats, fail-open state."""

    asynchronous = False  # which Redis client a backend name builds

    def __init__(self, model: str, backend="redis", *, url: str | None = None,
                 capacity: int | None = None, ttl_s: float | None = None, ns: str | None = None,
                 cache_sampled: bool = False, retry_after_s: float = 0.5) -> None:
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be None (no expiry) or > 0 seconds, got {ttl_s!r}")
        self.model, self.ttl_s, self.cache_sampled = model, ttl_s, cache_sampled
        self.namespace = ns or namespace(model)
        self.retry_after_s = retry_after_s
        self.stats = CacheStats()
        self._down_since: float | None = None
        self._last_try = 0.0
        self.backend = _make_backend(backend, url, capacity, asynchronous=self.asynchronous)

    def key(self, request: Request) -> str:
        return cache_key(self.model, request, self.namespace)

    def cacheable(self, request: Request) -> bool:
        """Greedy requests always; sampled ones (temperature > 0) only with cache_sampled=True."""
        return request.greedy or self.cache_sampled

    def _skip_backend(self) -> bool:
        """During an outage, do not touch the backend until retry_after_s has passed."""
        return self._down_since is not None and time.monotonic() - self._last_try < \
            self.retry_after_s

    def _failed(self, exc: Exception) -> None:
        self.stats.errors += 1
        self._last_try = time.monotonic()
        if self._down_since is None:
            self._down_since = self._last_try
            self.stats.outages += 1
            msg = (f"cache backend unreachable or failing ({type(exc).__name__}: {exc}); "
                   "serving misses")
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _ok(self) -> None:
        if self._down_since is not None:
            log.warning("cache backend reachable again after %.1f s",
                        time.monotonic() - self._down_since)
            self._down_since = None

    def _record(self, raw: str | None, t0: float) -> dict | None:
        dt = time.perf_counter() - t0
        if raw is None:
            self.stats.misses += 1
            self.stats.miss_latency_s.append(dt)
            return None
        try:
            value = json.loads(raw)
            if not isinstance(value, dict) or "text" not in value:
                raise ValueError(f"expected an object with 'text', got {type(value).__name__}")
        except ValueError as exc:  # a foreign or damaged entry: a miss, never a crash
            warnings.warn(f"ignoring an unreadable cache entry ({exc}); treated as a miss",
                          RuntimeWarning, stacklevel=3)
            self.stats.misses += 1
            self.stats.miss_latency_s.append(dt)
            return None
        self.stats.hits += 1
        self.stats.hit_latency_s.append(dt)
        self.stats.tokens_saved += len(value.get("token_ids", ()))
        return value

    def _encode(self, completion: Completion | dict) -> str:
        return canonical_json(completion_value(completion))

    @property
    def prefix(self) -> str:
        return f"labkit:{self.namespace}:"


def _make_backend(backend, url, capacity, asynchronous: bool):
    if not isinstance(backend, str):
        return backend
    if backend == "lru":
        return LRUBackend(capacity)
    if backend == "redis":
        return AsyncRedisBackend(url) if asynchronous else RedisBackend(url)
    raise ValueError(f"unknown cache backend {backend!r}; choose one of: {', '.join(BACKENDS)}")


def _backend_errors() -> tuple[type[Exception], ...]:
    import redis

    # Every Redis error, not just a lost connection: a READONLY replica or an OOM refusal must
    # not fail the request either.
    return (redis.RedisError, OSError)


class ResponseCache(_CacheCore):
    """Exact response cache for one model: ``get(request)`` -> value dict or None; ``put``.

    ``backend``: ``"redis"`` (``url`` or ``redis_url()``), ``"lru"`` (in-process, ``capacity``
    entries) or a backend object. ``ttl_s``: seconds an entry lives (None: forever).
    """

    def get(self, request: Request) -> dict | None:
        """The cached value, or None (miss, not cacheable, or backend down: fail open)."""
        if not self.cacheable(request):
            self.stats.skipped += 1
            return None
        t0 = time.perf_counter()
        raw = None
        if not self._skip_backend():
            try:
                raw = self.backend.get(self.key(request))
                self._ok()
            except _backend_errors() as exc:
                self._failed(exc)
        return self._record(raw, t0)

    def put(self, request: Request, completion: Completion | dict) -> bool:
        """Store a completion; False when not cacheable or the backend is down."""
        if not self.cacheable(request) or self._skip_backend():
            return False
        try:
            self.backend.set(self.key(request), self._encode(completion), self.ttl_s)
            self._ok()
            return True
        except _backend_errors() as exc:
            self._failed(exc)
            return False

    def clear(self) -> int:
        """Delete this namespace's entries (other models' entries stay); returns how many."""
        return self.backend.clear(self.prefix)


class AsyncResponseCache(_CacheCore):
    """``ResponseCache`` with coroutine methods (``await cache.get(request)``), on redis.asyncio."""

    asynchronous = True

    async def _call(self, fn, *args):
        out = fn(*args)
        return await out if hasattr(out, "__await__") else out  # the LRU backend is sync

    async def get(self, request: Request) -> dict | None:
        if not self.cacheable(request):
            self.stats.skipped += 1
            return None
        t0 = time.perf_counter()
        raw = None
        if not self._skip_backend():
            try:
                raw = await self._call(self.backend.get, self.key(request))
                self._ok()
            except _backend_errors() as exc:
                self._failed(exc)
        return self._record(raw, t0)

    async def put(self, request: Request, completion: Completion | dict) -> bool:
        if not self.cacheable(request) or self._skip_backend():
            return False
        try:
            await self._call(self.backend.set, self.key(request), self._encode(completion),
                             self.ttl_s)
            self._ok()
            return True
        except _backend_errors() as exc:
            self._failed(exc)
            return False

    async def clear(self) -> int:
        return await self._call(self.backend.clear, self.prefix)

    async def aclose(self) -> None:
        client = getattr(self.backend, "client", None)
        if client is not None:
            await client.aclose()
