"""``InferenceService``: the course's serving design with its defects fixed, one request path.

Every request takes the same path, whatever the engine and wherever the service runs (a
notebook, ``labkit serve``, a Ray Serve replica); only the ``Batcher`` differs. ``handle``::

    key = cache.key(request)       # once; None: no cache, use_cache=False, or not cacheable
    if key is None:
        completion = await batcher.submit(request, on_delta)
    elif (value := await cache.get(key)) is not None:
        return the cached answer   # cache_hit=True: the engine never sees the request
    else:                          # a miss; identical keys in flight share one generation:
        completion = await batcher.submit(request, on_delta)    # once per key in flight
        await cache.put(key, completion)
    return ServiceResponse(...)    # latency_s, cache_hit=False, this request's token times

Batchers (``labkit.serving.batchers``): ``DynamicBatcher`` for static engines,
``ContinuousGate`` for continuous ones (``engine.continuous``: hf-cb, vllm), ``ServeBatcher``
in a Ray Serve replica; ``batching=False`` is a DynamicBatcher of size 1 with no wait. The
choice is made once, in the constructor (``choose_batcher``).

- Keys are ``labkit.serving.keys`` sha256 keys: equal in every process (the reference used
  ``hash()``).
- Only greedy requests have a key (unless the cache was built with ``cache_sampled=True``):
  a cached sample would be replayed to everyone as if it were random.
- The engine never runs on the event loop, so one long generation does not block other clients.
- Each caller gets the completion of *its* request (the reference returned ``responses[0]``).
- Each request runs once (the reference re-ran queued requests) and with its own parameters;
  identical greedy requests that arrive while the first is generating share its generation.
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
import dataclasses
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from labkit.engines.base import Completion, Engine, Request, now, truncate_at_stop
from labkit.metrics import stats
from labkit.serving.batchers import (
    MAX_BATCH_SIZE,
    MAX_QUEUE,
    MAX_WAIT_MS,
    Batcher,
    BatcherClosed,
    DeltaCallback,
    DynamicBatcher,
    Overloaded,
    check_knobs,
)
from labkit.serving.cache import AsyncCache, completion_from_value
from labkit.serving.gate import ContinuousGate

__all__ = ["InferenceService", "ServiceResponse", "StreamEvent", "choose_batcher"]

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


def choose_batcher(engine: Engine, *, max_batch_size: int = MAX_BATCH_SIZE,
                   max_wait_ms: float = MAX_WAIT_MS, max_queue: int = MAX_QUEUE,
                   batching: bool = True) -> Batcher:
    """The batcher for ``engine``: a ``ContinuousGate`` (at most ``max_batch_size`` requests in
    the engine) for a continuous engine, else a ``DynamicBatcher``; ``batching=False``: one
    request per engine call (a DynamicBatcher of size 1 that does not wait), for the on/off
    comparison."""
    check_knobs(max_batch_size, max_wait_ms, max_queue)
    if not batching:
        return DynamicBatcher(engine, 1, 0.0, max_queue)
    if engine.continuous:
        return ContinuousGate(engine, max_batch_size, max_queue)
    return DynamicBatcher(engine, max_batch_size, max_wait_ms, max_queue)


class InferenceService:
    """Key, cache, batcher, engine, cache store (see module doc).

    ``cache``: an ``AsyncCache`` (``labkit.serving.cache.AsyncResponseCache``) or None.
    ``batcher``: any ``Batcher``; by default ``choose_batcher(engine, ...)`` builds one from
    ``max_batch_size`` (requests), ``max_wait_ms``, ``max_queue`` and ``batching``, which are
    ignored when a batcher is given.
    """

    def __init__(self, engine: Engine, cache: AsyncCache | None = None, *,
                 batcher: Batcher | None = None, model_name: str | None = None,
                 max_batch_size: int = MAX_BATCH_SIZE, max_wait_ms: float = MAX_WAIT_MS,
                 max_queue: int = MAX_QUEUE, batching: bool = True) -> None:
        self.engine = engine
        self.cache = cache
        self.model_name = model_name or engine.model_name
        self.batcher = batcher or choose_batcher(engine, max_batch_size=max_batch_size,
                                                 max_wait_ms=max_wait_ms, max_queue=max_queue,
                                                 batching=batching)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._flights: dict[str, _Flight] = {}
        self.counts = {"requests": 0, "completed": 0, "cache_hits": 0, "cache_misses": 0,
                       "coalesced": 0, "not_cached": 0, "rejected": 0, "cancelled": 0, "errors": 0}
        self._latency_s: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._ttft_s: deque[float] = deque(maxlen=LATENCY_WINDOW)

    # --- the request path ----------------------------------------------------------------------
    async def handle(self, request: Request, on_delta: DeltaCallback | None = None, *,
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
            key = self.cache.key(request) if use_cache and self.cache is not None else None
            if key is None:
                self.counts["not_cached"] += 1
                completion = await self.batcher.submit(request, on_delta)
            elif (value := await self.cache.get(key)) is not None:
                self.counts["cache_hits"] += 1
                return self._done(self._hit(request, value, t0, on_delta))
            else:
                self.counts["cache_misses"] += 1
                completion = await self._shared(key, request, on_delta)
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

    __call__ = handle

    async def complete(self, request: Request) -> Completion:
        """``handle`` returning just the Completion: a ``send`` for ``labkit.bench.loadgen`` load
        generators (``closed_loop(service.complete, requests, concurrency)``)."""
        return (await self.handle(request)).completion

    def _hit(self, request: Request, value: dict, t0: float,
             on_delta: DeltaCallback | None) -> ServiceResponse:
        """The cached ``value`` as this request's response: the whole text at once, now."""
        completion = completion_from_value(request.request_id, value, t0, now())
        if on_delta is not None and completion.text:
            on_delta(completion.text, completion.end_s)
        return ServiceResponse(request.request_id, completion.text, completion,
                               completion.end_s - t0, cache_hit=True)

    async def _shared(self, key: str, request: Request,
                      on_delta: DeltaCallback | None) -> Completion:
        """Generate a keyed request once, however many identical ones arrive meanwhile.

        Identical requests (same key) that miss the cache while the first is still generating
        join it (``coalesced``) instead of generating again, and get its deltas from the start.
        The generation and the cache store run in their own task: a caller that leaves does not
        cancel them for the others.
        """
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight()
            flight.task = asyncio.ensure_future(self._generate_and_store(key, request, flight))
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

    async def _generate_and_store(self, key: str, request: Request, flight: _Flight) -> Completion:
        completion = await self.batcher.submit(request, flight.deliver)
        await self.cache.put(key, completion)
        return completion

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
        return self.batcher.queue_depth

    def metrics(self) -> dict:
        """Counters, cache hit ratio, queue depth, the batcher's counters (``batching``) and
        latency percentiles (s)."""
        looked = self.counts["cache_hits"] + self.counts["cache_misses"]
        return {"model": self.model_name, "engine": self.engine.name, **self.counts,
                "cache_enabled": self.cache is not None,
                "cache_hit_ratio": self.counts["cache_hits"] / looked if looked else None,
                "queue_depth": self.queue_depth, "batching": self.batcher.counters(),
                "latency_s": stats(self._latency_s), "ttft_s": stats(self._ttft_s)}

    async def aclose(self, timeout_s: float = 30.0) -> None:
        """Stop accepting requests, let running work finish (up to ``timeout_s``), close the
        cache client. Waiting requests fail with ``BatcherClosed``."""
        self._closed = True
        await self.batcher.aclose(timeout_s)
        if self.cache is not None:
            await self.cache.aclose()

    async def __aenter__(self) -> InferenceService:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
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
