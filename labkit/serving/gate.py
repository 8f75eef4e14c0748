"""``ContinuousGate``: the ``Batcher`` for continuous engines (``engine.continuous``: hf-cb, vllm).

A continuous engine forms its batches itself, per token step: a request joins the running batch
at the next step and leaves when it ends. So the gate does not batch; it only bounds. Each
``submit`` waits for one of ``max_batch_size`` slots (at most ``max_queue`` requests wait;
beyond that ``Overloaded`` at once), then calls ``engine.generate([request])`` from a thread pool
of ``max_batch_size`` threads, so up to ``max_batch_size`` requests are in the engine together.

A slot frees when the engine finishes the request, not when its caller leaves: a cancelled
caller's generation is still running in the engine, and counting it as gone would let more
requests in than ``max_batch_size``. A caller that leaves cancels its request, though
(``Request.cancel()``), so the engine stops it at its next step and the slot frees soon after.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

from labkit.engines.base import Completion, Engine, Request
from labkit.serving.batchers import (
    MAX_BATCH_SIZE,
    MAX_QUEUE,
    BatcherClosed,
    DeltaCallback,
    Overloaded,
    cancel_on_leave,
    check_knobs,
    drain,
    token_sink,
)
from labkit.serving.handoff import handoff_for


class ContinuousGate:
    """At most ``max_batch_size`` requests in a continuous engine, ``max_queue`` waiting."""

    def __init__(self, engine: Engine, max_batch_size: int = MAX_BATCH_SIZE,
                 max_queue: int = MAX_QUEUE) -> None:
        check_knobs(max_batch_size, 0.0, max_queue)
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.joined: list[int] = []  # per request: requests in the engine once it had entered
        self._waiting = 0
        self._running: dict[concurrent.futures.Future, Request] = {}
        self._slots: asyncio.Semaphore | None = None  # made on first use, in the caller's loop
        self._closed = False
        self._pool = concurrent.futures.ThreadPoolExecutor(max_batch_size,
                                                           thread_name_prefix="gate-engine")

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return self._waiting

    def counters(self) -> dict:
        """Mode and knobs, requests in the engine now, the mean batch each request joined
        (``mean_batch_size``: requests in the engine as it entered, itself included), queue depth.
        """
        joined = self.joined
        return {"mode": "continuous", "max_batch_size": self.max_batch_size,
                "max_in_flight": self.max_batch_size, "in_flight": len(self._running),
                "requests": len(joined),
                "mean_batch_size": sum(joined) / len(joined) if joined else 0.0,
                "queue_depth": self._waiting}

    async def submit(self, request: Request, on_delta: DeltaCallback | None = None) -> Completion:
        """Wait for a slot, run ``request`` in the engine, return its completion.

        Raises ``Overloaded`` at once when ``max_queue`` requests already wait, and
        ``BatcherClosed`` after ``aclose()``. ``on_delta(text, t_s)`` is called on the event loop.
        """
        if self._closed:
            raise BatcherClosed("the batcher is shut down; no new requests are accepted")
        if self._waiting >= self.max_queue:
            raise Overloaded(f"overloaded: {self._waiting} requests already waiting "
                             f"(max_queue={self.max_queue}); retry later")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_batch_size)
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        if self._closed:
            self._slots.release()
            raise BatcherClosed("the batcher shut down before this request ran")
        loop = asyncio.get_running_loop()
        on_token = token_sink(handoff_for(loop), [on_delta])
        future = self._pool.submit(self.engine.generate, [request], on_token)
        self._running[future] = request
        self.joined.append(len(self._running))
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(self._release, f))
        [completion] = await cancel_on_leave(asyncio.wrap_future(future), request)
        return completion

    def _release(self, future: concurrent.futures.Future) -> None:
        """The engine is done with ``future``'s request: its slot goes to the next waiter."""
        self._running.pop(future, None)
        self._slots.release()

    async def aclose(self, timeout_s: float = 30.0) -> None:
        """Stop accepting; give the requests in the engine up to ``timeout_s`` to finish, then
        cancel them and give the engine ``ABORT_WAIT_S`` to stop them.

        Requests still waiting for a slot fail with ``BatcherClosed`` as slots free up.
        """
        self._closed = True
        running = dict(self._running)
        await drain([asyncio.wrap_future(f) for f in running], list(running.values()), timeout_s)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> ContinuousGate:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
