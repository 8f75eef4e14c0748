"""Batchers: how concurrent requests reach one engine. One protocol, two implementations here.

``InferenceService`` hands every request that the cache did not answer to a ``Batcher``::

    completion = await batcher.submit(request, on_delta)   # this request's own completion
    batcher.queue_depth                                     # requests waiting to enter the engine
    batcher.counters()                                      # metrics()["batching"]
    await batcher.aclose(timeout_s)

- ``DynamicBatcher`` (static engines, ``hf``): each ``submit`` puts the request in a bounded
  queue and waits on its own future. A worker task takes the first waiting request, then keeps
  collecting until the batch holds ``max_batch_size`` requests or ``max_wait_ms`` has passed
  since that first one was queued, and runs ``engine.generate(batch)`` in a worker thread, so
  the event loop keeps accepting requests while the model runs. Each completion resolves exactly
  the future of the request it belongs to.
- ``ContinuousGate`` (continuous engines, ``engine.continuous``: hf-cb, vllm): they schedule per
  token step themselves, so requests go straight to the engine from a thread pool, at most
  ``max_batch_size`` at a time and at most ``max_queue`` more waiting; a batcher in front would
  only add waiting.
- ``ServeBatcher`` (``labkit.serving.serve_batcher``): Ray Serve's ``@serve.batch``, inside a
  replica.

Knobs and their trade-off: a larger ``max_batch_size`` raises throughput until the device is
saturated; a longer ``max_wait_ms`` fills batches under light load but adds that much latency to
every request that waits. Their defaults (``MAX_BATCH_SIZE``, ``MAX_WAIT_MS``, ``MAX_QUEUE``)
are defined here once. Requests with different sampling parameters may share a batch: the
engine runs each parameter group with its own settings (the ``hf`` engine as separate
``generate`` calls, continuous engines per request). A full queue is a clear ``Overloaded``
error at once, not an unbounded wait.

A caller that leaves (its task is cancelled: a client hung up) cancels its request
(``Request.cancel()``), so the engine stops generating it at the next step; ``aclose`` cancels
the requests still running when its ``timeout_s`` is over and waits up to ``ABORT_WAIT_S`` for
the engine to let go of them, so a shutdown never waits on a long generation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from labkit.engines.base import Completion, Engine, Request, TokenCallback, now
from labkit.serving.handoff import Handoff, handoff_for

MAX_BATCH_SIZE = 16  # requests in one engine call (continuous engines: in the engine at once)
MAX_WAIT_MS = 10.0  # how long a batch waits for more requests after its first one (ms)
MAX_QUEUE = 1024  # requests waiting for the engine before new ones are rejected (Overloaded)
ABORT_WAIT_S = 5.0  # how long aclose waits for the engine to stop the requests it cancelled (s)


class Overloaded(RuntimeError):
    """The queue is full: the request was rejected at once instead of waiting without bound."""


class BatcherClosed(RuntimeError):
    """The batcher was shut down before this request could run."""


DeltaCallback = Callable[[str, float], None]  # (text_delta, t_s), called on the event loop
T = TypeVar("T")


class Batcher(Protocol):
    """How ``InferenceService`` reaches the engine (see module doc)."""

    @property
    def queue_depth(self) -> int:
        """Requests waiting to enter the engine."""

    def counters(self) -> dict:
        """``mode``, the knobs, ``mean_batch_size``, ``queue_depth`` and the batch counts."""

    async def submit(self, request: Request, on_delta: DeltaCallback | None = None) -> Completion:
        """Run ``request`` on the engine and return its completion; ``on_delta(text, t_s)`` is
        called on the event loop for each new piece of text. Raises ``Overloaded`` or
        ``BatcherClosed``."""

    async def aclose(self, timeout_s: float = 30.0) -> None:
        """Stop accepting requests and give running ones up to ``timeout_s`` to finish."""


def check_knobs(max_batch_size: int, max_wait_ms: float, max_queue: int) -> None:
    """Raise ValueError naming the first knob out of range."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size!r}")
    if max_wait_ms < 0:
        raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
    if max_queue < 1:
        raise ValueError(f"max_queue must be >= 1, got {max_queue!r}")


def token_sink(handoff: Handoff, deliveries: Sequence[DeltaCallback | None]
               ) -> TokenCallback | None:
    """The ``on_token`` to hand the engine for a batch whose row ``i`` streams its text to
    ``deliveries[i]`` (None: that row does not stream), each delta passed to the event loop
    through ``handoff``; None when no row streams, so the engine skips its per-token text work
    (hf decodes the text per token, a ``ProcessEngine`` sends each token over its socket)."""
    if all(d is None for d in deliveries):
        return None

    def on_token(i: int, _tok: int, delta: str, t: float) -> None:
        if deliveries[i] is not None and delta:
            handoff.put(deliveries[i], delta, t)

    return on_token


def batch_counters(batch_sizes: list[int]) -> dict:
    """``batches`` run, ``requests`` in them, ``mean_batch_size`` (requests; 0.0 before the
    first batch) and ``batch_size_counts`` (size -> batches) of a list of engine-call sizes."""
    n = len(batch_sizes)
    return {"batches": n, "requests": sum(batch_sizes),
            "mean_batch_size": sum(batch_sizes) / n if n else 0.0,
            "batch_size_counts": dict(sorted(Counter(batch_sizes).items()))}


@dataclass
class _Item:
    request: Request
    future: asyncio.Future
    on_delta: DeltaCallback | None
    enqueued_s: float = field(default_factory=now)


class DynamicBatcher:
    """Collects concurrent requests into batches for one engine (see module doc)."""

    def __init__(self, engine: Engine, max_batch_size: int = MAX_BATCH_SIZE,
                 max_wait_ms: float = MAX_WAIT_MS, max_queue: int = MAX_QUEUE) -> None:
        check_knobs(max_batch_size, max_wait_ms, max_queue)
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_ms = max_wait_ms
        self.max_queue = max_queue
        self.batch_sizes: list[int] = []  # one entry per engine call, in order
        self._pending: deque[_Item] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._running: list[_Item] = []
        self._call: asyncio.Future | None = None  # the engine.generate call now running
        self._closed = False
        # One thread: the engine sees one batch at a time, as a GPU would run it.
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batcher")

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (not counting the batch that is running)."""
        return len(self._pending)

    def counters(self) -> dict:
        """Mode and knobs, batches run, requests served, mean batch size (requests), size
        histogram, queue depth."""
        return {"mode": "dynamic", "max_batch_size": self.max_batch_size,
                "max_wait_ms": self.max_wait_ms, **batch_counters(self.batch_sizes),
                "queue_depth": self.queue_depth}

    async def submit(self, request: Request, on_delta: DeltaCallback | None = None) -> Completion:
        """Queue ``request`` and wait for its completion.

        Raises ``Overloaded`` at once when ``max_queue`` requests are already waiting, and
        ``BatcherClosed`` if the batcher is (or gets) shut down before the request runs.
        ``on_delta(text, t_s)`` is called on the event loop for each new piece of text.
        """
        if self._closed:
            raise BatcherClosed("the batcher is shut down; no new requests are accepted")
        if self._worker is None:
            self._wakeup = asyncio.Event()
            self._worker = asyncio.create_task(self._run(), name="dynamic-batcher")
        if len(self._pending) >= self.max_queue:
            raise Overloaded(f"overloaded: {len(self._pending)} requests already waiting "
                             f"(max_queue={self.max_queue}); retry later")
        item = _Item(request, asyncio.get_running_loop().create_future(), on_delta)
        self._pending.append(item)
        self._wakeup.set()
        return await cancel_on_leave(item.future, request)

    async def _collect(self) -> list[_Item]:
        """The first waiting request, then more until the batch is full or the wait is over.

        Requests stay in the deque until taken, so a timeout can never lose one.
        """
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        batch = [self._pending.popleft()]
        # The wait counts from when the first request was queued: one that already waited
        # behind a running batch is not held for another max_wait_ms.
        deadline = batch[0].enqueued_s + self.max_wait_ms / 1000
        while len(batch) < self.max_batch_size:
            if self._pending:
                batch.append(self._pending.popleft())
                continue
            remaining = deadline - now()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        return [item for item in batch if not item.future.done()]  # drop cancelled callers

    async def _run(self) -> None:
        handoff = handoff_for(asyncio.get_running_loop())
        while True:
            batch = await self._collect()
            if not batch:
                continue
            self._running = batch
            self.batch_sizes.append(len(batch))

            on_token = token_sink(handoff, [
                functools.partial(_deliver, item) if item.on_delta is not None else None
                for item in batch])
            try:
                self._call = asyncio.get_running_loop().run_in_executor(
                    self._pool, self.engine.generate, [item.request for item in batch], on_token)
                completions = await self._call
            except Exception as err:  # the engine failed: every caller in the batch hears why
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(err)
            else:
                for item, completion in zip(batch, completions, strict=True):
                    if not item.future.done():
                        item.future.set_result(completion)
            finally:
                self._running = []

    async def aclose(self, timeout_s: float = 30.0) -> None:
        """Stop accepting, fail waiting requests with ``BatcherClosed``, finish the running batch.

        The batch already in the engine is allowed ``timeout_s`` to finish; then its requests
        are cancelled and the engine gets ``ABORT_WAIT_S`` to stop them. Callers whose request
        did not finish get ``BatcherClosed``.
        """
        self._closed = True
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(
                    BatcherClosed("the batcher shut down before this request ran"))
        running = self._running  # the engine call too: a caller that left may be in it
        await drain([item.future for item in running] + ([self._call] if running else []),
                    [item.request for item in running], timeout_s)
        for item in self._running:
            if not item.future.done():
                item.future.set_exception(BatcherClosed(
                    f"the batcher shut down; this request's batch did not finish in {timeout_s} s"))
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=False)

    async def __aenter__(self) -> DynamicBatcher:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


async def cancel_on_leave(work: Awaitable[T], request: Request) -> T:
    """``await work``; if the caller is cancelled meanwhile, cancel ``request`` too, so the
    engine stops generating it."""
    try:
        return await work
    except asyncio.CancelledError:
        request.cancel()
        raise


async def drain(futures: list[asyncio.Future], requests: list[Request], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for the running ``futures``; then cancel their ``requests`` and
    wait up to ``ABORT_WAIT_S`` more for the engine to stop them."""
    pending = [f for f in futures if not f.done()]
    if pending and timeout_s > 0:
        _done, pending = await asyncio.wait(pending, timeout=timeout_s)
    if pending:
        for request in requests:
            request.cancel()
        await asyncio.wait(pending, timeout=ABORT_WAIT_S)


def _deliver(item: _Item, delta: str, t: float) -> None:
    if item.on_delta is not None and not item.future.done():
        item.on_delta(delta, t)
