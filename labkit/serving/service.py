"""``InferenceService``: the course's serving design with its defects fixed.

Request path (DESIGN.md's data flow)::

    request -> sha256 key -> async cache lookup (hit: return, cache_hit=True)
            -> DynamicBatcher queue -> engine.generate(batch) in a worker thread
            -> this request's own future -> cache store (greedy only) -> response

- Keys are ``labkit.serving.cache`` sha256 keys: equal in every process (the reference used
  ``hash()``).
- Only greedy requests are stored (unless the cache was built with ``cache_sampled=True``):
  a cached sample would be replayed to everyone as if it were random.
- The engine never runs on the event loop, so one long generation does not block other clients.
- Each caller gets the completion of *its* request (the reference returned ``responses[0]``).
- Each request runs once (the reference re-ran queued requests) and with its own parameters;
  identical greedy requests that arrive while the first is generating share its generation.
- Continuous engines (``engine.continuous``: hf-cb, vllm) schedule per token step themselves:
  requests go straight to the engine from a thread pool, at most ``max_batch_size`` at a time
  and at most ``max_queue`` more waiting; a static batcher in front would only add waiting.
- Overload is a clear ``Overloaded`` error at once, not an unbounded queue.

Streaming: ``async for event in service.stream(request)`` yields ``StreamEvent`` (text delta and
its ``perf_counter`` time); the last event carries the full ``ServiceResponse``. A client that
stops listening (breaks out, or its task is cancelled) only drops its own request: the batch it
was in runs on and the other callers get their results.

Times are ``time.perf_counter()`` seconds; ``latency_s`` is from ``handle``/``stream`` entry to
the response, so it includes the cache lookup and queueing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from labkit.engines.base import Completion, Engine, Request, now, truncate_at_stop
from labkit.metrics import stats
from labkit.serving.batchers import BatcherClosed, DynamicBatcher, Overloaded

__all__ = ["BatcherClosed", "InferenceService", "Overloaded", "ServiceResponse", "StreamEvent"]

LATENCY_WINDOW = 10_000  # latencies kept for metrics() percentiles (the most recent ones)


@dataclass
class ServiceResponse:
    """What a caller gets back. ``completion`` carries the per-token timestamps.

    ``completion.start_s`` is when the service received the request, so ``completion.ttft_s``
    and ``completion.e2e_s`` are what this caller saw (queueing included). A cache hit has every
    token stamped at the moment the cached answer was read: TTFT = E2E = lookup time.
    """

    request_id: str
    text: str
    completion: Completion
    latency_s: float
    cache_hit: bool

    @property
    def ttft_s(self) -> float | None:
        return self.completion.ttft_s

    @property
    def token_times_s(self) -> list[float]:
        return self.completion.token_times_s

    @property
    def finish_reason(self) -> str:
        return self.completion.finish_reason


@dataclass
class StreamEvent:
    """One piece of streamed text and when it was produced (perf_counter s); the last event of a
    stream has ``text == ""`` and ``response`` set."""

    text: str
    t_s: float
    response: ServiceResponse | None = None


@dataclass
class _Flight:
    """One generation shared by identical cacheable requests (see ``InferenceService._shared``)."""

    task: asyncio.Future | None = None
    text: str = ""
    listeners: list = dataclasses.field(default_factory=list)

    def deliver(self, delta: str, t_s: float) -> None:
        self.text += delta
        for listener in list(self.listeners):
            listener(delta, t_s)


class InferenceService:
    """Cache, then batcher, then engine, then cache store (see module doc).

    ``cache``: an async cache with ``await get(request) -> dict | None`` and
    ``await put(request, completion)`` (``labkit.serving.cache.AsyncResponseCache``), or None.
    ``max_batch_size``/``max_wait_ms``/``max_queue``: the ``DynamicBatcher`` knobs; for a
    continuous engine ``max_batch_size`` is the most requests in the engine at once.
    ``batching=False`` sends one request at a time (batch size 1), for the on/off comparison.
    """

    def __init__(self, engine: Engine, cache=None, *, model_name: str | None = None,
                 max_batch_size: int = 16, max_wait_ms: float = 10.0, max_queue: int = 1024,
                 batching: bool = True) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError(f"need max_batch_size >= 1, max_queue >= 1, max_wait_ms >= 0; got "
                             f"{max_batch_size!r}, {max_queue!r}, {max_wait_ms!r}")
        self.engine = engine
        self.cache = cache
        self.model_name = model_name or engine.model_name
        self.continuous = bool(getattr(engine, "continuous", False)) and batching
        self.max_batch_size = max_batch_size if batching else 1
        self.max_queue = max_queue
        self.batcher = None if self.continuous else DynamicBatcher(
            engine, self.max_batch_size, max_wait_ms if batching else 0.0, max_queue)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self.max_batch_size, thread_name_prefix="service-engine") if self.continuous else None
        self._slots: asyncio.Semaphore | None = None
        self._waiting = 0
        self._in_flight = 0
        self._in_flight_seen: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._ids = itertools.count()
        self._flights: dict[str, _Flight] = {}
        self.counts = {"requests": 0, "completed": 0, "cache_hits": 0, "cache_misses": 0,
                       "coalesced": 0, "not_cached": 0, "rejected": 0, "cancelled": 0, "errors": 0}
        self._latency_s: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._ttft_s: deque[float] = deque(maxlen=LATENCY_WINDOW)

    # --- the request path ----------------------------------------------------------------------
    async def handle(self, request: Request, on_delta=None, *,
                     use_cache: bool = True) -> ServiceResponse:
        """Serve one request; ``on_delta(text, t_s)`` is called for each new piece of text.

        ``use_cache=False`` (HTTP: a ``Cache-Control: no-cache`` request header) sends the request
        to the engine even if it is cacheable: no lookup, no sharing, no store; a load test that
        wants to measure the model sets it. Raises ``Overloaded`` when the queue is full and
        ``BatcherClosed`` after ``aclose()``.
        """
        t0 = now()
        self._bind_loop()
        if self._closed:
            raise BatcherClosed("the service is shut down; no new requests are accepted")
        self.counts["requests"] += 1
        try:
            cached = use_cache and self._cacheable(request)
            hit = await self._lookup(request, t0) if cached else None
            if hit is not None:
                if on_delta is not None and hit.text:
                    on_delta(hit.text, hit.completion.end_s)
                return self._done(hit)
            if cached:
                completion = await self._shared(request, on_delta)
            else:
                self.counts["not_cached"] += 1
                completion = await self._generate(request, on_delta)
            end = now()
            # A request that joined an identical generation already under way gets the tokens
            # made before it arrived at its own arrival: its TTFT is never negative.
            completion = dataclasses.replace(
                completion, request_id=request.request_id, start_s=t0, end_s=end,
                token_times_s=[max(t, t0) for t in completion.token_times_s])
            return self._done(ServiceResponse(request.request_id, completion.text, completion,
                                              end - t0, cache_hit=False))
        except Overloaded:
            self.counts["rejected"] += 1
            raise
        except asyncio.CancelledError:
            self.counts["cancelled"] += 1
            raise
        except Exception:
            self.counts["errors"] += 1
            raise

    async def _shared(self, request: Request, on_delta) -> Completion:
        """Generate a cacheable request once, however many identical ones arrive meanwhile.

        Identical greedy requests that miss the cache while the first is still generating join
        it (``coalesced``) instead of generating again, and get its deltas from the start. The
        generation and the cache store run in their own task: a caller that leaves does not
        cancel them for the others.
        """
        key = self._key(request)
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight()
            flight.task = asyncio.ensure_future(self._generate_and_store(request, flight))
            flight.task.add_done_callback(lambda _t: self._flights.pop(key, None))
            self._flights[key] = flight
        else:
            self.counts["coalesced"] += 1
        if on_delta is not None:
            if flight.text:
                on_delta(flight.text, now())
            flight.listeners.append(on_delta)
        try:
            return await asyncio.shield(flight.task)
        finally:
            if on_delta is not None and on_delta in flight.listeners:
                flight.listeners.remove(on_delta)

    async def _generate_and_store(self, request: Request, flight: _Flight) -> Completion:
        completion = await self._generate(request, flight.deliver)
        await self.cache.put(request, completion)
        return completion

    def _key(self, request: Request) -> str:
        key = getattr(self.cache, "key", None)
        if key is not None:
            return key(request)
        from labkit.serving.cache import cache_key

        return cache_key(self.model_name, request)

    __call__ = handle

    async def complete(self, request: Request) -> Completion:
        """``handle`` returning just the Completion: a ``send`` for ``labkit.bench.loadgen`` load
        generators (``closed_loop(service.complete, requests, concurrency)``)."""
        return (await self.handle(request)).completion

    def _cacheable(self, request: Request) -> bool:
        if self.cache is None:
            return False
        rule = getattr(self.cache, "cacheable", None)
        return rule(request) if rule is not None else request.greedy

    async def _lookup(self, request: Request, t0: float) -> ServiceResponse | None:
        """The cached answer of a cacheable request as a response, or None (a miss)."""
        value = await self.cache.get(request)
        if value is None:
            self.counts["cache_misses"] += 1
            return None
        self.counts["cache_hits"] += 1
        from labkit.serving.cache import completion_from_value

        completion = completion_from_value(request.request_id, value, t0, now())
        return ServiceResponse(request.request_id, value["text"], completion,
                               completion.end_s - t0, True)

    async def _generate(self, request: Request, on_delta) -> Completion:
        if not self.continuous:
            return await self.batcher.submit(request, on_delta)
        if self._waiting >= self.max_queue:
            raise Overloaded(f"overloaded: {self._waiting} requests already waiting "
                             f"(max_queue={self.max_queue}); retry later")
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        loop = asyncio.get_running_loop()
        self._in_flight += 1
        self._in_flight_seen.append(self._in_flight)

        def on_token(_i: int, _tok: int, delta: str, t: float) -> None:
            if on_delta is not None and delta:
                loop.call_soon_threadsafe(on_delta, delta, t)

        future = self._pool.submit(self.engine.generate, [request], on_token)

        def release(_f) -> None:  # the slot frees when the engine is done, not when a caller quits
            loop.call_soon_threadsafe(self._release)

        future.add_done_callback(release)
        [completion] = await asyncio.wrap_future(future)
        return completion

    def _release(self) -> None:
        self._in_flight -= 1
        self._slots.release()

    def _done(self, response: ServiceResponse) -> ServiceResponse:
        self.counts["completed"] += 1
        self._latency_s.append(response.latency_s)
        if response.ttft_s is not None:
            self._ttft_s.append(response.ttft_s)
        return response

    # --- streaming -------------------------------------------------------------------------
    async def stream(self, request: Request, *,
                     use_cache: bool = True) -> AsyncIterator[StreamEvent]:
        """Yield text deltas as they are generated, then one final event with the response
        (``use_cache`` as in ``handle``).

        Text after a stop string is never sent: a tail that could still become a stop string is
        held back until it is clear. Leaving the loop early cancels only this request.
        """
        queue: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self.handle(request, lambda d, t: queue.put_nowait((d, t)),
                                                 use_cache=use_cache))
        task.add_done_callback(lambda _t: queue.put_nowait(None))
        sent, seen = "", ""
        try:
            while (item := await queue.get()) is not None:
                seen += item[0]
                safe = _safe_prefix(seen, request.stop)
                if len(safe) > len(sent):
                    yield StreamEvent(safe[len(sent):], item[1])
                    sent = safe
            response = task.result()  # raises the request's error, if any
            if response.text.startswith(sent) and len(response.text) > len(sent):
                yield StreamEvent(response.text[len(sent):], response.completion.end_s)
            yield StreamEvent("", now(), response)
        finally:
            if not task.done():
                task.cancel()

    # --- metrics and shutdown --------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Requests waiting to enter the engine."""
        return self._waiting if self.continuous else self.batcher.queue_depth

    def metrics(self) -> dict:
        """Counters, cache hit ratio, queue depth, batch sizes and latency percentiles (s)."""
        looked = self.counts["cache_hits"] + self.counts["cache_misses"]
        if self.continuous:
            seen = self._in_flight_seen
            batching = {"mode": "continuous", "max_in_flight": self.max_batch_size,
                        "in_flight": self._in_flight,
                        # the batch each request joined: requests in the engine as it entered
                        "mean_batch_size": sum(seen) / len(seen) if seen else 0.0,
                        "queue_depth": self._waiting}
        else:
            batching = {"mode": "dynamic", "max_batch_size": self.max_batch_size,
                        "max_wait_ms": self.batcher.max_wait_ms, **self.batcher.stats()}
        return {"model": self.model_name, "engine": getattr(self.engine, "name", "?"),
                **self.counts,
                "cache_enabled": self.cache is not None,
                "cache_hit_ratio": self.counts["cache_hits"] / looked if looked else None,
                "queue_depth": self.queue_depth, "batching": batching,
                "latency_s": stats(self._latency_s), "ttft_s": stats(self._ttft_s)}

    async def aclose(self, timeout_s: float = 30.0) -> None:
        """Stop accepting requests, let running work finish (up to ``timeout_s``), close the
        cache client. Waiting requests fail with ``BatcherClosed``."""
        self._closed = True
        if self.batcher is not None:
            await self.batcher.aclose(timeout_s)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        closer = getattr(self.cache, "aclose", None)
        if closer is not None:
            await closer()

    async def __aenter__(self) -> InferenceService:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            if self.continuous:
                self._slots = asyncio.Semaphore(self.max_batch_size)
        elif self._loop is not loop:
            raise RuntimeError("this InferenceService is bound to another event loop; create "
                               "one service per event loop (e.g. inside the server or the cell "
                               "that awaits it)")


def _safe_prefix(text: str, stop: list[str] | None) -> str:
    """The part of ``text`` that can be sent: cut at a stop string, minus a tail that is the
    start of one (it may still complete into a stop string)."""
    if not stop:
        return text
    text, found = truncate_at_stop(text, stop)
    if found:
        return text
    hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - hold]
