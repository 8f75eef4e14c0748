"""Sweeps of offered load for lab 05's "Latency under load": rates, batch sizes, the naive service.

- ``sweep_workloads``: one workload per offered rate, ``round(rate x duration_s)`` requests each,
  all distinct across the sweep (so no cache, in any service, turns a rate into a cache test).
- ``rate_sweep``: open-loop runs at rising rates through any ``send`` (``labkit.bench.loadgen``),
  one ``runs[]`` entry each, stopping past the knee if asked. ``labkit bench serve`` does the same
  over HTTP (``labkit.bench.serve.run_serve_bench``).
- ``LoopThread`` and ``reference_sender``: the course's reference service on an event loop of its
  own, as in its own server process, so its blocked loop (its DEFECT 3) stalls its own requests
  and not the load generator's clock.
- ``batch_size_sweep``: ``InferenceService`` at several ``max_batch_size`` under one load (a
  fixed number of users, or an open-loop rate); ``fake_batching_sweep``: the same question put
  to the fake server as a batching server of known timing. The lab's exercise chooses from them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable, Coroutine, Sequence

from labkit.bench.loadgen import Sender, check_rate, open_loop
from labkit.bench.slo import meets_at_p99
from labkit.config import SEED
from labkit.engines.base import Completion, Engine, Request, now


def sweep_workloads(make: Callable[[int], list[Request]], rates: Sequence[float],
                    duration_s: float) -> list[list[Request]]:
    """Per rate, ``round(rate * duration_s)`` requests (at least 2), sliced in order from one
    workload ``make(total)`` so that no request repeats across the sweep."""
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0 s, got {duration_s!r}")
    counts = [max(2, round(check_rate(r) * duration_s)) for r in rates]
    pool, out, at = make(sum(counts)), [], 0
    for n in counts:
        out.append(pool[at:at + n])
        at += n
    return out


def rate_sweep(send: Sender, workloads: Sequence[Sequence[Request]], rates: Sequence[float], *,
               slo: dict[str, float] | None = None, burstiness: float = 1.0,
               max_concurrency: int | None = None, stop_past_knee: bool = False,
               seed: int = SEED, name: str = "open-loop", **fields) -> list[dict]:
    """One open-loop run per rate (rising), each over its own workload; returns ``runs[]``
    entries (``LoadResult.summary``, with ``fields`` added). ``stop_past_knee`` (needs ``slo``):
    stop after the first rate that misses the SLO at p99 (``labkit.bench.slo.find_knee``)."""
    from labkit.bench.loadgen import run_sync

    if stop_past_knee and not slo:
        raise ValueError("stop_past_knee needs an slo")
    runs = []
    for rate, workload in sorted(zip(rates, workloads), key=lambda pair: pair[0]):
        result = run_sync(open_loop(send, workload, rate, burstiness=burstiness,
                                    max_concurrency=max_concurrency, seed=seed))
        runs.append(result.summary(name, slo=slo, **fields))
        if stop_past_knee and not meets_at_p99(runs[-1], slo):
            break
    return runs


class LoopThread:
    """An asyncio event loop on a thread of its own: a stand-in for another process's loop.

    ``with LoopThread() as loop: future = loop.submit(coro)`` (a ``concurrent.futures.Future``).
    """

    def __init__(self, name: str = "labkit-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=name)

    def submit(self, coro: Coroutine):
        """Run ``coro`` on this loop; returns a ``concurrent.futures.Future`` of its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def __enter__(self) -> LoopThread:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()


class FixedLength(Engine):
    """Wraps an engine so that every request runs to its ``max_tokens`` (``ignore_eos``), as
    in a benchmark workload: the reference service builds its own requests and cannot ask for
    it, and an answer that ends at once would make it look fast for the wrong reason."""

    def __init__(self, inner: Engine) -> None:
        super().__init__(inner.model_name, inner.device, inner.dtype)
        self.inner, self.name, self.continuous = inner, inner.name, inner.continuous
        self.tokenizer, self.max_model_len = inner.tokenizer, inner.max_model_len

    def generate(self, requests, on_token=None):
        """The inner engine's completions of ``requests`` with ``ignore_eos=True``."""
        return self.inner.generate([dataclasses.replace(r, ignore_eos=True) for r in requests],
                                   on_token)


def reference_sender(service, loop: LoopThread, tokenizer) -> Sender:
    """``send(request) -> Completion`` through the course's ``OptimizedInferenceService`` running
    on ``loop``. It does not stream: its one piece of text arrives at the end, so TTFT = E2E.
    Output tokens are counted by ``tokenizer`` (the service returns text only)."""
    from labkit.serving.reference import GenerationRequest

    async def send(request: Request) -> Completion:
        prompt = request.prompt if request.prompt is not None else \
            request.messages[-1]["content"]
        start = now()
        reply = await asyncio.wrap_future(loop.submit(service(GenerationRequest(
            prompt=prompt, max_tokens=request.max_tokens, temperature=request.temperature))))
        end = now()
        ids = tokenizer(reply.text, add_special_tokens=False)["input_ids"]
        return Completion(request.request_id, reply.text, list(ids), 0, "length", start,
                          [end], end)

    return send


def batch_size_sweep(engine: Engine, sizes: Sequence[int], workload: Sequence[Request], *,
                     slo: dict[str, float], concurrency: int | None = None,
                     rate: float | None = None, max_wait_ms: float = 20.0,
                     seed: int = SEED) -> list[dict]:
    """``InferenceService(engine, max_batch_size=m)`` (no cache, in this process) for each ``m``
    in ``sizes``, each under the same load of ``workload``: ``concurrency`` closed-loop clients
    (users who each wait for their answer) or open-loop arrivals at ``rate`` req/s. One
    ``runs[]`` entry per size with ``max_batch_size``, ``max_wait_ms`` and the service's
    ``mean_batch_size`` (requests per engine call)."""
    from labkit.bench.loadgen import closed_loop, run_sync
    from labkit.serving.service import InferenceService

    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency= (closed loop) or rate= (open loop)")

    async def one(size: int) -> dict:
        async with InferenceService(engine, None, max_batch_size=size,
                                    max_wait_ms=max_wait_ms) as service:
            fresh = [dataclasses.replace(r, request_id=f"{r.request_id}-m{size}")
                     for r in workload]
            result = await (closed_loop(service.complete, fresh, concurrency) if rate is None
                            else open_loop(service.complete, fresh, rate, seed=seed))
            batching = service.metrics()["batching"]
        return result.summary("batch-size", slo=slo, max_batch_size=size,
                              max_wait_ms=max_wait_ms,
                              mean_batch_size=batching.get("mean_batch_size"))

    return [run_sync(one(size)) for size in sizes]


def fake_batching_sweep(sizes: Sequence[int], *, users: int, output_tokens: int,
                        slo: dict[str, float], requests_per_user: int = 2,
                        ttft_s: float = 0.04, itl_s: float = 0.01,
                        itl_per_running_s: float = 0.002) -> list[dict]:
    """The fake server (``labkit.bench.fake_server``) as a batching server with ``size`` slots
    for each size, each gap ``itl_per_running_s`` longer per other request in its batch, loaded
    by ``users`` closed-loop clients (``requests_per_user`` requests each) over HTTP. One
    ``runs[]`` entry per size with ``max_batch_size`` (its slots) and the server's timing."""
    from labkit.bench.client import serve_load
    from labkit.bench.fake_server import MODEL, FakeServer
    from labkit.bench.loadgen import run_sync
    from labkit.bench.workloads import short_workload

    runs = []
    for size in sizes:
        with FakeServer(ttft_s, itl_s, size, itl_per_running_s=itl_per_running_s) as server:
            result = run_sync(serve_load(server.url, short_workload(
                users * requests_per_user, output_tokens), model=MODEL, concurrency=users))
        runs.append(result.summary("fake-batching", slo=slo, max_batch_size=size,
                                   ttft_s_server=ttft_s, itl_s_server=itl_s,
                                   itl_per_running_s=itl_per_running_s))
    return runs
