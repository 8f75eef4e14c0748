"""``ServeBatcher``: Ray Serve's ``@serve.batch`` as the ``Batcher`` of a replica's service.

``deploy(batcher="serve")`` builds one in each replica (``labkit.serving.replica``), so the
replica runs the same ``InferenceService`` as everywhere else and only the batching is Serve's:
``submit`` hands the request to a ``serve.batch`` queue (``max_batch_size``,
``batch_wait_timeout_s = max_wait_ms / 1000``), and Serve calls one ``engine.generate(batch)``
(in a worker thread) per batch it forms. Serve drops a caller that left before its batch ran.

A caller that leaves cancels its request (``Request.cancel()``): an engine already running its
batch stops generating it at the next step. There is no ``max_queue`` here: Serve bounds a
replica itself (``max_ongoing_requests``), and ``serve.batch`` reads the replica's config when it
first queues, so build it inside a replica.
Ray is imported when a ``ServeBatcher`` is built, not when this module is.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from labkit.engines.base import Completion, Engine, Request
from labkit.serving.batchers import (
    MAX_BATCH_SIZE,
    MAX_WAIT_MS,
    BatcherClosed,
    DeltaCallback,
    batch_counters,
    cancel_on_leave,
    check_knobs,
    token_sink,
)
from labkit.serving.handoff import handoff_for


@dataclass
class _Queued:
    request: Request
    on_delta: DeltaCallback | None
    started: bool = False  # Serve put it in a batch


class ServeBatcher:
    """Batches formed by ``@serve.batch`` for one engine (see module doc)."""

    def __init__(self, engine: Engine, max_batch_size: int = MAX_BATCH_SIZE,
                 max_wait_ms: float = MAX_WAIT_MS) -> None:
        from ray import serve

        check_knobs(max_batch_size, max_wait_ms, 1)
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_ms = max_wait_ms
        self.batch_sizes: list[int] = []  # one entry per engine call, in order
        self._waiting = 0
        self._closed = False
        self._batched = serve.batch(max_batch_size=max_batch_size,
                                    batch_wait_timeout_s=max_wait_ms / 1000)(self._run_batch)

    @property
    def queue_depth(self) -> int:
        """Requests in Serve's batch queue (not counting the batch that is running)."""
        return self._waiting

    def counters(self) -> dict:
        """Mode and knobs, batches run, requests served, mean batch size (requests), size
        histogram, queue depth."""
        return {"mode": "serve.batch", "max_batch_size": self.max_batch_size,
                "max_wait_ms": self.max_wait_ms, **batch_counters(self.batch_sizes),
                "queue_depth": self._waiting}

    async def submit(self, request: Request, on_delta: DeltaCallback | None = None) -> Completion:
        """Queue ``request`` in Serve's batcher and wait for its completion; ``on_delta(text,
        t_s)`` is called on the event loop for each new piece of text."""
        if self._closed:
            raise BatcherClosed("the batcher is shut down; no new requests are accepted")
        item = _Queued(request, on_delta)
        self._waiting += 1
        try:
            return await cancel_on_leave(self._batched(item), request)
        finally:
            if not item.started:  # left (or failed) before Serve ran it
                self._waiting -= 1

    async def _run_batch(self, items: list[_Queued]) -> list[Completion]:
        """What Serve calls with each batch it formed: one ``engine.generate`` in a thread."""
        for item in items:
            item.started = True
        self._waiting -= len(items)
        self.batch_sizes.append(len(items))
        on_token = token_sink(handoff_for(asyncio.get_running_loop()),
                              [it.on_delta for it in items])
        return await asyncio.to_thread(self.engine.generate, [it.request for it in items],
                                       on_token)

    async def aclose(self, timeout_s: float = 30.0) -> None:
        """Stop accepting requests; the batch Serve is running finishes on its own (Serve drains
        a replica before it stops it, so there is nothing to wait for here)."""
        self._closed = True
