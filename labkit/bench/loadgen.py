"""Load generators: closed and open loop over any ``send(request)`` coroutine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from labkit.config import SEED
from labkit.engines.base import Completion, Engine, Request, now
from labkit.metrics import summarize

Sender = Callable[[Request], Awaitable[Completion]]


@dataclass
class LoadResult:
    """Completions of one load run, its wall time (s) and the most requests in flight at once."""

    completions: list[Completion]
    duration_s: float
    max_in_flight: int
    concurrency: int | None = None
    request_rate: float | None = None
    send_times_s: list[float] = dataclasses.field(default_factory=list)

    def summary(self, name: str, slo: dict[str, float] | None = None, **extra) -> dict:
        """One ``runs[]`` entry of the bench JSON contract (``labkit.metrics.summarize``)."""
        return summarize(self.completions, self.duration_s, name=name,
                         concurrency=self.concurrency, request_rate=self.request_rate, slo=slo,
                         **extra)


class _InFlight:
    def __init__(self) -> None:
        self.now = self.max = 0

    async def run(self, send: Sender, request: Request, sent: list[float]) -> Completion:
        t = now()
        sent.append(t)
        self.now += 1
        self.max = max(self.max, self.now)
        try:
            completion = await send(request)
        finally:
            self.now -= 1
        # Client view: the request started when it was sent (queueing included).
        return dataclasses.replace(completion, start_s=min(completion.start_s, t))


async def closed_loop(send: Sender, requests: Sequence[Request], concurrency: int) -> LoadResult:
    """``concurrency`` clients share ``requests``; each sends its next one when the last returns.

    Completions come back in request order.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency!r}")
    queue = list(enumerate(requests))[::-1]
    out: list[Completion | None] = [None] * len(requests)
    tracker, sent = _InFlight(), []

    async def client() -> None:
        while queue:
            i, req = queue.pop()
            out[i] = await tracker.run(send, req, sent)

    start = now()
    await asyncio.gather(*(client() for _ in range(min(concurrency, len(requests)))))
    return LoadResult(list(out), now() - start, tracker.max, concurrency=concurrency,
                      send_times_s=sorted(sent))


def poisson_arrivals(n: int, rate: float, seed: int = SEED) -> list[float]:
    """Arrival offsets (s) of ``n`` requests at ``rate`` req/s: exponential gaps, first at 0.

    ``rate=inf`` sends everything at once.
    """
    import numpy as np

    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s (or inf), got {rate!r}")
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    gaps[0] = 0.0
    return [float(v) for v in np.cumsum(gaps)]


async def open_loop(send: Sender, requests: Sequence[Request], rate: float,
                    seed: int = SEED) -> LoadResult:
    """Send ``requests`` at Poisson arrival times of ``rate`` req/s, never waiting for replies.

    Completions come back in request order.
    """
    arrivals = poisson_arrivals(len(requests), rate, seed)
    tracker, sent = _InFlight(), []
    tasks = []
    start = now()
    for offset, req in zip(arrivals, requests):
        delay = start + offset - now()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(tracker.run(send, req, sent)))
    out = await asyncio.gather(*tasks)
    return LoadResult(list(out), now() - start, tracker.max, request_rate=rate,
                      send_times_s=sorted(sent))


def engine_sender(engine: Engine) -> Sender:
    """``send`` for an engine on one worker thread: one request at a time, in arrival order.

    The event loop stays free while the engine works; requests that arrive meanwhile wait in the
    executor's queue, and that wait shows in their TTFT (no batching: that is the next lab).
    """
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    async def send(request: Request) -> Completion:
        loop = asyncio.get_running_loop()
        [completion] = await loop.run_in_executor(pool, engine.generate, [request])
        return completion

    return send


def run_sync(coro):
    """Run a coroutine to completion from sync code, also inside Jupyter's running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
