"""``InferenceService``: the course's serving design with its defects fixed, one request path.

Every request takes the same path, whatever the engine and wherever the service runs (a
notebook, ``labkit serve``, a Ray Serve replica); only the ``Batcher`` differs. ``handle``::

    key = cache.key(request)       # once; None: no cache, use_cache=False, or not cacheable
    if key is not None and (value := await cache.get(key)) is not None:
        return the cached answer   # cache_hit=True: the engine never sees the request
    engine.check(request)          # InvalidRequest: empty prompt, beyond the context (400)
    request.deadline_s = arrival + deadline_s
    if key is None:
        completion = await batcher.submit(request, on_delta)
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
- Work is bounded: ``engine.check`` (tokenizing, in a worker thread, so a huge prompt does not
  stall the event loop) refuses what cannot fit the model's context, and a generation that
  runs past ``deadline_s`` seconds from arrival is stopped by the engine (``DeadlineExceeded``).
  A caller that leaves cancels its generation (unless identical requests still share it), and
  ``aclose`` cancels what is still running after its ``timeout_s``, so shutdown is bounded.

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

from labkit.engines.base import (
    ABORTED,
    Completion,
    Engine,
    InvalidRequest,
    Request,
    now,
)
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
from labkit.serving.flights import Flights
from labkit.serving.gate import ContinuousGate
from labkit.serving.responses import ServiceResponse, StreamEvent, safe_prefix

__all__ = ["DeadlineExceeded", "InferenceService", "choose_batcher"]

LATENCY_WINDOW = 10_000  # latencies kept for metrics() percentiles (the most recent ones)
DEADLINE_S = 120.0  # a request's generation is stopped this long after it arrived (s)


class DeadlineExceeded(TimeoutError):
    """The request's generation ran past the service's ``deadline_s`` and was stopped."""


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
    ignored when a batcher is given. ``deadline_s``: seconds from arrival after which a
    request's generation is stopped (None: no deadline).
    """

    def __init__(self, engine: Engine, cache: AsyncCache | None = None, *,
                 batcher: Batcher | None = None, model_name: str | None = None,
                 max_batch_size: int = MAX_BATCH_SIZE, max_wait_ms: float = MAX_WAIT_MS,
                 max_queue: int = MAX_QUEUE, batching: bool = True,
                 deadline_s: float | None = DEADLINE_S) -> None:
        if deadline_s is not None and not deadline_s > 0:
            raise ValueError(f"deadline_s must be None (no deadline) or > 0 seconds, "
                             f"got {deadline_s!r}")
        self.engine = engine
        self.deadline_s = deadline_s
        self.cache = cache
        self.model_name = model_name or engine.model_name
        self.batcher = batcher or choose_batcher(engine, max_batch_size=max_batch_size,
                                                 max_wait_ms=max_wait_ms, max_queue=max_queue,
                                                 batching=batching)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._flights = Flights(self.batcher.submit, self._store)
        self.counts = {"requests": 0, "completed": 0, "cache_hits": 0, "cache_misses": 0,
                       "coalesced": 0, "not_cached": 0, "rejected": 0, "invalid": 0,
                       "deadline_exceeded": 0, "cancelled": 0, "errors": 0}
        self._latency_s: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._ttft_s: deque[float] = deque(maxlen=LATENCY_WINDOW)

    # --- the request path ----------------------------------------------------------------------
    async def handle(self, request: Request, on_delta: DeltaCallback | None = None, *,
                     use_cache: bool = True) -> ServiceResponse:
        """Serve one request; ``on_delta(text, t_s)`` is called for each new piece of text.

        ``use_cache=False`` (HTTP: a ``Cache-Control: no-cache`` request header) sends the request
        to the engine even if it is cacheable: no lookup, no sharing, no store; a load test that
        wants to measure the model sets it. Raises ``InvalidRequest`` (empty prompt, beyond the
        model's context), ``Overloaded`` when the queue is full, ``DeadlineExceeded`` when the
        generation ran past ``deadline_s``, and ``BatcherClosed`` after ``aclose()``.
        """
        t0 = now()
        self._bind_loop()
        if self._closed:
            raise BatcherClosed("the service is shut down; no new requests are accepted")
        self.counts["requests"] += 1
        try:
            key = self.cache.key(request) if use_cache and self.cache is not None else None
            if key is not None and (value := await self.cache.get(key)) is not None:
                self.counts["cache_hits"] += 1
                return self._done(self._hit(request, value, t0, on_delta))
            self.counts["not_cached" if key is None else "cache_misses"] += 1
            request = await self._admit(request, t0)
            if key is None:
                completion = await self.batcher.submit(request, on_delta)
            else:
                if key in self._flights:
                    self.counts["coalesced"] += 1
                completion = await self._flights.share(key, request, on_delta)
            self._check_finished(request, completion, t0)
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
        except InvalidRequest:
            self.counts["invalid"] += 1
            raise
        except DeadlineExceeded:
            self.counts["deadline_exceeded"] += 1
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

    async def _admit(self, request: Request, t0: float) -> Request:
        """``request`` checked by the engine (``InvalidRequest``; tokenizing runs in a worker
        thread) and given its deadline, ``deadline_s`` after its arrival at ``t0``."""
        await asyncio.to_thread(self.engine.check, request)
        if self.deadline_s is None or request.deadline_s is not None:
            return request
        return dataclasses.replace(request, deadline_s=t0 + self.deadline_s)

    def _check_finished(self, request: Request, completion: Completion, t0: float) -> None:
        """Raise for a generation the engine aborted (``t0``: the request's arrival):
        ``BatcherClosed`` when a shutdown cancelled it, else ``DeadlineExceeded`` (a caller
        that left is not waiting here any more, so its deadline stopped it)."""
        if completion.finish_reason != ABORTED:
            return
        if self._closed:
            raise BatcherClosed("the service shut down before this request finished")
        raise DeadlineExceeded(
            f"the generation was stopped at its deadline, {now() - t0:.1f} s after the request "
            f"arrived, after {completion.output_tokens} of max_tokens {request.max_tokens} "
            "tokens; ask for fewer tokens or send a shorter prompt")

    async def _store(self, key: str, completion: Completion) -> None:
        """Put a finished generation in the cache (a flight does this once per key)."""
        await self.cache.put(key, completion)

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
        held back until it is clear. Deltas that arrived while the caller was busy with the last
        event come as one event (stamped with the newest delta's time), so a slow consumer gets
        fewer, larger pieces instead of falling behind. Leaving the loop early cancels only this
        request.
        """
        queue: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self.handle(request, lambda d, t: queue.put_nowait((d, t)),
                                                 use_cache=use_cache))
        task.add_done_callback(lambda _t: queue.put_nowait(None))
        sent, seen, ended = "", "", False
        try:
            while not ended and (item := await queue.get()) is not None:
                seen, t = seen + item[0], item[1]
                while not queue.empty():  # deltas that came while the last one was sent: one event
                    if (item := queue.get_nowait()) is None:
                        ended = True
                        break
                    seen, t = seen + item[0], item[1]
                safe = safe_prefix(seen, request.stop)
                if len(safe) > len(sent):
                    yield StreamEvent(safe[len(sent):], t)
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
        """Counters, cache hit ratio, the cache's state and its backend errors and outages,
        queue depth, the batcher's counters (``batching``) and latency percentiles (s)."""
        looked = self.counts["cache_hits"] + self.counts["cache_misses"]
        cache = self.cache
        return {"model": self.model_name, "engine": self.engine.name, **self.counts,
                "cache_enabled": cache is not None,
                "cache_hit_ratio": self.counts["cache_hits"] / looked if looked else None,
                "cache_state": cache.state if cache is not None else "off",
                "cache_errors": cache.counters.errors if cache is not None else 0,
                "cache_outages": cache.counters.outages if cache is not None else 0,
                "queue_depth": self.queue_depth, "batching": self.batcher.counters(),
                "latency_s": stats(self._latency_s), "ttft_s": stats(self._ttft_s)}

    async def health(self) -> dict:
        """``status``: ``"ok"``, ``"degraded"`` (the cache is down: every request is generated)
        or ``"shutting down"``; ``cache``: ``"ok"``, ``"off"`` or ``"degraded: reason"``."""
        cache = await self.cache.probe() if self.cache is not None else "off"
        status = "shutting down" if self._closed else \
            "ok" if cache in ("ok", "off") else "degraded"
        return {"status": status, "cache": cache}

    async def aclose(self, timeout_s: float = 30.0) -> None:
        """Stop accepting requests, let running work finish (up to ``timeout_s``, then cancel
        it), close the cache client. Waiting requests fail with ``BatcherClosed``."""
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
