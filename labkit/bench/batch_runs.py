"""Static batches, the DynamicBatcher and continuous batching, timed in interleaved rounds.

The runs of the batching lab (lab 02) and of ``labkit bench batching`` (``labkit.bench.batching``
plans them: sizes, workloads), one ``runs[]`` entry of the bench JSON contract each:

- ``static_sweep``: offline static batches of each size (``"static"`` runs), a batch padded to
  its longest prompt and run until its longest output is done; latency counts from the start of
  the request's own batch.
- ``equal_work``: the same requests served three ways with at most ``concurrency`` in flight:
  offline static batches of ``concurrency`` (``"static"``), ``concurrency`` closed-loop clients
  through ``labkit.serving.batchers.DynamicBatcher`` (``"dynamic"``: batches formed from
  whatever waits, up to ``concurrency``, after at most ``max_wait_ms``), and ``concurrency``
  closed-loop clients on a continuous-batching engine (``"continuous"``: ``hf-cb`` or
  ``vllm``; a finished request leaves at once and a waiting one joins at the next step).
  TTFT and E2E of the closed-loop runs count from when the client sent the request.

Interleaved rounds. On a shared machine the load changes from second to second: a burst of other
work during one setting's run makes that setting look slower, so a sweep that runs one setting
after the other measures the load as much as the setting. (On 2 pinned cores, two competing busy
processes halved batch 1's and batch 16's tokens/s alike, 5.4x -> 5.0x apart, while their
tokens per CPU-second stayed put.) Both functions therefore run in ``rounds``: each round runs
every setting once (in reverse order every other round), and each setting's run pools its
rounds. Every run also has ``cpu_s``, the CPU seconds this process used, so ``cpu_s /
duration_s`` shows how many cores the run really got.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
from collections.abc import Sequence

from labkit.engines.base import Completion, Engine, Request, now
from labkit.metrics import STATS_KEYS, summarize
from labkit.serving.batchers import MAX_WAIT_MS, DynamicBatcher
from labkit.widgets import Progress


def _oom_types() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.cuda.OutOfMemoryError,)


def _failed_run(name: str, error: str, n: int, **fields) -> dict:
    nan_stats = {k: math.nan for k in STATS_KEYS}
    return {"name": name, "batch_size": None, "concurrency": None, "request_rate": None,
            "num_requests": n, "output_tokens": 0, "duration_s": math.nan,
            "requests_per_s": math.nan, "output_tokens_per_s": math.nan,
            "ttft_s": nan_stats, "tpot_s": nan_stats, "itl_s": nan_stats, "e2e_s": nan_stats,
            "error": error, **fields}


class _Pool:
    """One setting's completions, wall time and CPU time (s), pooled over rounds."""

    def __init__(self) -> None:
        self.done: list[Completion] = []
        self.duration_s = self.cpu_s = 0.0
        self.batches: list[list[int]] = []  # engine-call sizes, or prompt lengths per batch

    def timed(self, fn, *args):
        """Run ``fn(*args)``, add its wall and CPU seconds, return its result."""
        wall, cpu = now(), time.process_time()
        try:
            return fn(*args)
        finally:
            self.duration_s += now() - wall
            self.cpu_s += time.process_time() - cpu


def _round_slice(requests: Sequence[Request], n: int, r: int) -> list[Request]:
    """Round ``r``'s ``n`` requests: the next ``n`` after round ``r - 1``'s, wrapping around."""
    start = (r * n) % len(requests)
    return [requests[(start + i) % len(requests)] for i in range(n)]


def static_sweep(engine: Engine, requests: Sequence[Request], batch_sizes: Sequence[int],
                 sort: bool = False, workload: str = "", progress: bool = True,
                 max_batches: int | None = None, rounds: int = 1) -> list[dict]:
    """One ``"static"`` run per batch size, the sizes interleaved over ``rounds`` rounds.

    Each round runs every size once on ``max_batches`` batches (None: all of ``requests``; the
    next round takes the next requests), in order or sorted by prompt length (``sort=True``).
    Extra fields: ``prompt_padding_fraction`` and ``decode_padding_fraction`` (0..1, of the
    batches as run), ``sorted``, ``workload``, ``rounds``, ``cpu_s``. A size that raises
    ``torch.cuda.OutOfMemoryError`` becomes a run with ``"error": "OOM"`` and NaN metrics, and
    the sweep goes on without it.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches!r}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds!r}")
    sizes = list(batch_sizes)
    pools = {b: _Pool() for b in sizes}
    failed: dict[int, int] = {}
    bar = Progress(rounds * len(sizes), "static sweep", progress)
    for r in range(rounds):
        for b in sizes:
            bar.update()
            if b in failed:
                continue
            n = len(requests) if max_batches is None else min(len(requests), max_batches * b)
            reqs = _round_slice(requests, n, r)
            lens = [len(engine.encode(q)) for q in reqs]
            if sort:
                order = sorted(range(n), key=lambda i: lens[i])
                reqs, lens = [reqs[i] for i in order], [lens[i] for i in order]
            pool = pools[b]
            try:
                for i in range(0, n, b):
                    pool.done += pool.timed(engine.generate, reqs[i:i + b])
                    pool.batches.append(lens[i:i + b])
            except _oom_types():
                import torch

                torch.cuda.empty_cache()
                failed[b] = n
    bar.close()
    runs = []
    for b in sizes:
        fields = dict(batch_size=b, sorted=sort, workload=workload, rounds=rounds)
        if b in failed:
            runs.append(_failed_run("static", "OOM", failed[b], **fields))
            continue
        pool = pools[b]
        runs.append(summarize(pool.done, pool.duration_s, name="static", **fields,
                              cpu_s=pool.cpu_s, prompt_tokens=sum(map(sum, pool.batches)),
                              prompt_padding_fraction=_pooled_padding(pool.batches),
                              decode_padding_fraction=_pooled_padding(
                                  _batches([c.output_tokens for c in pool.done], b))))
    return runs


def _batches(values: list[int], batch_size: int) -> list[list[int]]:
    return [values[i:i + batch_size] for i in range(0, len(values), batch_size)]


def _pooled_padding(batches: list[list[int]]) -> float:
    """``padding_fraction`` of batches as they ran (each padded to its own longest)."""
    total = sum(len(b) * max(b) for b in batches if b)
    return (total - sum(map(sum, batches))) / total if total else 0.0


def static_run(engine: Engine, requests: Sequence[Request], batch_size: int,
               sort: bool = False, workload: str = "", max_batches: int | None = None) -> dict:
    """``requests`` offline in static batches of ``batch_size``: one ``"static"`` run
    (``static_sweep`` of one size and one round; ``num_requests`` says how many ran)."""
    [run] = static_sweep(engine, requests, [batch_size], sort=sort, workload=workload,
                         progress=False, max_batches=max_batches)
    return run


async def _dynamic(engine: Engine, requests: Sequence[Request], concurrency: int,
                   max_batch_size: int, max_wait_ms: float):
    from labkit.bench.loadgen import closed_loop

    async with DynamicBatcher(engine, max_batch_size=max_batch_size,
                              max_wait_ms=max_wait_ms) as batcher:
        result = await closed_loop(batcher.submit, requests, concurrency)
        return result, batcher.counters()


def _continuous(engine: Engine, requests: Sequence[Request], concurrency: int):
    """Closed-loop clients, each handing single requests to a continuous-batching engine from
    its own thread (the engine merges them per step); the ``LoadResult``."""
    from labkit.bench.loadgen import closed_loop, run_sync

    if not engine.continuous:
        raise ValueError(f"engine {engine.name!r} does not batch continuously; use hf-cb or vllm")
    pool = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="client")

    async def send(request: Request):
        [completion] = await asyncio.get_running_loop().run_in_executor(
            pool, engine.generate, [request])
        return completion

    try:
        return run_sync(closed_loop(send, requests, concurrency))
    finally:
        pool.shutdown(wait=True)



def equal_work(static_engine: Engine, continuous_engine: Engine | None,
               requests: Sequence[Request], concurrency: int, *, rounds: int = 1,
               max_wait_ms: float = MAX_WAIT_MS, workload: str = "wide",
               progress: bool = True) -> list[dict]:
    """The same ``requests``, at most ``concurrency`` in flight, served as static batches,
    through a ``DynamicBatcher`` (both on ``static_engine``) and continuously (on
    ``continuous_engine``; None: left out): one run each (see module doc), in that order.

    The requests are split into ``rounds`` equal parts; each round serves its part with every
    system in turn. Extra fields: ``workload``, ``rounds``, ``cpu_s``, ``e2e_by_output``
    (``[output tokens, E2E s]`` of each request, for a scatter plot); ``"static"`` has
    ``decode_padding_fraction`` (of its batches), ``"dynamic"`` ``max_batch_size``,
    ``max_wait_ms`` and ``mean_batch_size`` (requests per engine call), ``"continuous"`` the
    ``engine`` that ran it.
    """
    from labkit.bench.loadgen import run_sync

    per = len(requests) // max(rounds, 1)
    if rounds < 1 or per < concurrency:
        raise ValueError(f"need rounds >= 1 and at least concurrency={concurrency} requests per "
                         f"round; got {len(requests)} requests in {rounds!r} rounds")
    names = ["static", "dynamic"] + (["continuous"] if continuous_engine is not None else [])
    pools = {name: _Pool() for name in names}
    bar = Progress(rounds * len(names), "equal work", progress)
    for r in range(rounds):
        part = list(requests[r * per:(r + 1) * per])
        for name in names if r % 2 == 0 else names[::-1]:
            pool = pools[name]
            if name == "static":
                for i in range(0, per, concurrency):
                    pool.done += pool.timed(static_engine.generate, part[i:i + concurrency])
            elif name == "dynamic":
                result, counters = pool.timed(run_sync, _dynamic(
                    static_engine, part, concurrency, concurrency, max_wait_ms))
                pool.done += result.completions
                pool.batches.append([counters["batches"], counters["requests"]])
            else:
                pool.done += pool.timed(_continuous, continuous_engine, part,
                                        concurrency).completions
            bar.update()
    bar.close()
    calls, served = (sum(x) for x in zip(*pools["dynamic"].batches))
    extra = {"static": dict(batch_size=concurrency, decode_padding_fraction=_pooled_padding(
                 _batches([c.output_tokens for c in pools["static"].done], concurrency))),
             "dynamic": dict(concurrency=concurrency, max_batch_size=concurrency,
                             max_wait_ms=max_wait_ms,
                             mean_batch_size=served / calls if calls else 0.0),
             "continuous": dict(concurrency=concurrency, engine=getattr(continuous_engine,
                                                                        "name", None))}
    return [summarize(pool.done, pool.duration_s, name=name, workload=workload, rounds=rounds,
                      cpu_s=pool.cpu_s, **extra[name],
                      e2e_by_output=[[c.output_tokens, c.e2e_s] for c in pool.done])
            for name, pool in pools.items()]


def e2e_by_half_s(run: dict) -> tuple[float, float]:
    """Median E2E (s) of the shorter and of the longer half of an ``equal_work`` run's requests
    (split at the median output length; ``e2e_by_output``). Under static or dynamic batching a
    short request waits for its batch's longest one; under continuous batching it leaves when it
    is done, so comparing the shorter halves of two systems shows what leaving early buys."""
    import statistics

    pairs = run["e2e_by_output"]
    median = statistics.median(tokens for tokens, _ in pairs)
    return (statistics.median(e2e for tokens, e2e in pairs if tokens <= median),
            statistics.median(e2e for tokens, e2e in pairs if tokens > median))
