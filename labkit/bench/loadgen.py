"""Load generators: closed and open loop over any ``send(request)`` coroutine.

- closed loop (``closed_loop``): ``concurrency`` clients, each sends its next request when its
  last one is answered. The server sets the pace: a slow server simply receives fewer requests,
  so its queue never grows and its latency looks fine (coordinated omission).
- open loop (``open_loop``): requests arrive on their own schedule (``arrival_times``: Poisson,
  or gamma with a ``burstiness``), whatever the server does. Each request is timed from its
  *scheduled* send time, so a request that waits inside the client (behind ``max_concurrency``,
  or behind a busy event loop) counts that wait; vLLM's ``bench serve`` started the clock when a
  slot was free and hid it (vllm-project/vllm issue #54101).

Both count what is in the system: ``max_in_flight`` (requests sent and unanswered at once, at
most) and ``mean_in_system`` (the time average of requests due and unanswered, a wait in the
client included: the L of Little's law L = throughput x mean latency).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import math
import numbers
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from labkit.config import SEED
from labkit.engines.base import Completion, Engine, Request, now
from labkit.metrics import stats, summarize

Sender = Callable[[Request], Awaitable[Completion]]


@dataclass
class LoadResult:
    """Completions of one load run (in request order) and what the load generator saw.

    ``duration_s``: wall time from the first send to the last answer (s). ``max_in_flight``:
    most requests sent to the server and not yet answered at once. ``mean_in_system``: time
    average of the requests due and not yet answered (requests; open loop: from each request's
    scheduled send, so a wait for a ``max_concurrency`` slot or a late dispatch counts, as in
    its latency). ``send_delay_s``: per request,
    the actual send time minus the scheduled one (s): the wait for a slot plus the load
    generator's own lateness (0 in closed loop, where a request is due when its client is
    free). ``late_s``: per request, how late the load generator dispatched it (s; open loop),
    the part of ``send_delay_s`` that is the client's fault.
    """

    completions: list[Completion]
    duration_s: float
    max_in_flight: int
    concurrency: int | None = None
    request_rate: float | None = None
    send_times_s: list[float] = dataclasses.field(default_factory=list)
    mean_in_system: float = 0.0
    send_delay_s: list[float] = dataclasses.field(default_factory=list)
    late_s: list[float] = dataclasses.field(default_factory=list)
    burstiness: float | None = None
    max_concurrency: int | None = None

    def summary(self, name: str, slo: dict[str, float] | None = None, **extra) -> dict:
        """One ``runs[]`` entry of the bench JSON contract (``labkit.metrics.summarize``) over
        the answered requests, plus ``failed`` (requests whose completion has an ``error``: an
        HTTP rejection, a deadline), the load generator's ``max_in_flight`` and
        ``mean_in_system`` (requests), and ``throughput_x_time_in_system``: every request that
        left the system (answered or failed) per second times their mean time in it, Little's
        L = throughput x W computed from per-request times (requests; equal to
        ``mean_in_system`` when the load generator's clock is right). Open loop adds
        ``burstiness``, ``max_concurrency`` and ``late_s`` (STATS of the dispatch lateness, s)."""
        answered = [c for c in self.completions if getattr(c, "error", None) is None]
        in_system_s = sum(c.end_s - c.start_s for c in self.completions)
        fields = {"max_in_flight": self.max_in_flight, "mean_in_system": self.mean_in_system,
                  "throughput_x_time_in_system": in_system_s / self.duration_s}
        if self.request_rate is not None:
            fields.update(burstiness=self.burstiness, max_concurrency=self.max_concurrency,
                          late_s=stats(self.late_s))
        return summarize(answered, self.duration_s, name=name, concurrency=self.concurrency,
                         request_rate=self.request_rate, slo=slo,
                         failed=len(self.completions) - len(answered), **fields, **extra)


class _Count:
    """A count of requests over time: its largest value and its time integral (request-s)."""

    def __init__(self) -> None:
        self.now = self.max = 0
        self.area = 0.0
        self.since = now()

    def change(self, delta: int, since: float | None = None) -> None:
        """Add ``delta`` requests now; ``since``: one arrived at that earlier time (s), so its
        time in the system counts from then."""
        t = now()
        self.area += self.now * (t - self.since) + (t - since if since is not None else 0.0)
        self.now, self.since = self.now + delta, t
        self.max = max(self.max, self.now)

    def mean(self, duration_s: float) -> float:
        """Time-average of the count over ``duration_s`` seconds ending now (requests)."""
        self.change(0)
        return self.area / duration_s if duration_s > 0 else 0.0


async def closed_loop(send: Sender, requests: Sequence[Request], concurrency: int) -> LoadResult:
    """``concurrency`` clients share ``requests``; each sends its next one when the last returns.

    Completions come back in request order, each timed from its send.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency!r}")
    queue = list(enumerate(requests))[::-1]
    out: list[Completion | None] = [None] * len(requests)
    tracker, sent = _Count(), []

    async def client() -> None:
        while queue:
            i, req = queue.pop()
            t = now()
            sent.append(t)
            tracker.change(+1)
            try:
                completion = await send(req)
            finally:
                tracker.change(-1)
            out[i] = dataclasses.replace(completion, start_s=min(completion.start_s, t))

    start = tracker.since = now()
    await asyncio.gather(*(client() for _ in range(min(concurrency, len(requests)))))
    duration = now() - start
    return LoadResult(list(out), duration, tracker.max, concurrency=concurrency,
                      send_times_s=sorted(sent), mean_in_system=tracker.mean(duration),
                      send_delay_s=[0.0] * len(requests))


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = SEED) -> list[float]:
    """Scheduled send times (s from the start) of ``n`` requests offered at ``rate`` req/s.

    The gaps are gamma-distributed with shape ``burstiness`` and mean ``1 / rate`` (vLLM's
    ``--burstiness``): 1 gives exponential gaps, a Poisson process; below 1 burstier, above 1
    more even, ``inf`` evenly spaced. The first request is at 0, and like vLLM the gaps are
    scaled so that the ``n`` arrivals span exactly ``(n - 1) / rate`` s: the offered rate is
    the one asked for, whatever the seed. ``rate=inf`` sends everything at once.
    """
    import numpy as np

    check_rate(rate)
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0 (1 = Poisson), got {burstiness!r}")
    if math.isinf(rate) or n < 2:
        return [0.0] * n
    if math.isinf(burstiness):
        gaps = np.ones(n - 1)
    else:
        gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / burstiness, size=n - 1)
    times = np.concatenate([[0.0], np.cumsum(gaps)])
    return [float(v) for v in times * ((n - 1) / rate / times[-1])]


def check_rate(rate: float) -> float:
    """``rate`` if it is a valid offered load (> 0 requests/s, or inf), else a ValueError."""
    if not (isinstance(rate, numbers.Real) and rate > 0):
        raise ValueError(f"request rate must be > 0 requests/s (or inf), got {rate!r}")
    return rate


async def open_loop(send: Sender, requests: Sequence[Request], rate: float, *,
                    burstiness: float = 1.0, max_concurrency: int | None = None,
                    seed: int = SEED) -> LoadResult:
    """Send ``requests`` at their ``arrival_times`` (``rate`` req/s), never waiting for replies.

    At most ``max_concurrency`` requests are sent and unanswered at once (None: no cap); a
    request that finds no free slot waits in the client. Every completion's ``start_s`` is its
    *scheduled* send time, so TTFT and E2E include any wait in the client (for a slot, or behind
    a late event loop). Completions come back in request order.
    """
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1 (or None: no cap), got "
                         f"{max_concurrency!r}")
    arrivals = arrival_times(len(requests), rate, burstiness, seed)
    system, flight, sent = _Count(), _Count(), []
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    delays, late = [0.0] * len(requests), [0.0] * len(requests)

    async def one(i: int, scheduled: float, req: Request) -> Completion:
        late[i] = now() - scheduled
        system.change(+1, since=scheduled)  # due since its scheduled time, however late we are
        try:
            if slots is not None:
                await slots.acquire()
            t = now()
            sent.append(t)
            delays[i] = t - scheduled
            flight.change(+1)
            try:
                completion = await send(req)
            finally:
                flight.change(-1)
                if slots is not None:
                    slots.release()
        finally:
            system.change(-1)
        return dataclasses.replace(completion, start_s=scheduled)

    tasks = []
    start = system.since = flight.since = now()
    for i, (offset, req) in enumerate(zip(arrivals, requests)):
        delay = start + offset - now()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, start + offset, req)))
    out = await asyncio.gather(*tasks)
    duration = now() - start
    return LoadResult(list(out), duration, flight.max, request_rate=rate,
                      send_times_s=sorted(sent), mean_in_system=system.mean(duration),
                      send_delay_s=delays, late_s=late, burstiness=burstiness,
                      max_concurrency=max_concurrency)


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
