"""``labkit bench serve``: load a running OpenAI-compatible server, one run per concurrency or rate.

The requests go through the HTTP client of ``labkit.bench.client`` (streaming, each chunk time
stamped), so every figure is what a client of that server sees; a labkit server's response
cache is bypassed unless asked for, so the runs time the model. Used by the serving lab (lab 05)
and against any server (labkit's, vLLM's).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from labkit.bench.client import serve_load, server_info
from labkit.engines.base import Request


def _cache_hits(url: str) -> int | None:
    import httpx

    try:
        return httpx.get(url.rstrip("/") + "/metrics", timeout=10).json().get("cache_hits")
    except (httpx.HTTPError, ValueError):
        return None  # not a labkit server


def run_serve_bench(url: str, concurrencies: Sequence[int] = (1, 4, 16),
                    num_requests: int = 32, model: str | None = None, stream: bool = True,
                    request_rate: float | None = None, json_path: str | Path | None = None,
                    *, min_output_tokens: int = 16, max_output_tokens: int = 16,
                    output_len_dist: str = "fixed", seed: int = 0, warmup: int = 2,
                    workload: Sequence[Request] | None = None, view=None,
                    server_cache: bool = False) -> dict:
    """The ``serve`` bench: one run per concurrency (or one open-loop run at ``request_rate``).

    Requests: ``labkit.bench.workloads.make_workload(num_requests, ...)`` (chat, greedy,
    ``ignore_eos``) unless ``workload`` is given. ``warmup`` requests are sent first and not
    counted. Each run has the contract's fields plus ``failed`` (requests with an HTTP error;
    the statistics are over the others), ``cache_hits`` (labkit servers: hits during the run),
    ``stream`` and ``server_cache``. Requests bypass a labkit server's response cache unless
    ``server_cache`` (see ``load_sender``), so every run times the model. ``view``: a
    ``labkit.widgets`` live view (its ``start``/``update``/``finish`` are called). Writes
    ``json_path`` if given.
    """
    from labkit.bench.loadgen import run_sync
    from labkit.bench.workloads import make_workload
    from labkit.metrics import bench_document, summarize, write_json

    info = server_info(url)
    model = model or info["model"]
    requests = list(workload) if workload is not None else make_workload(
        num_requests, seed=seed, min_output_tokens=min_output_tokens,
        max_output_tokens=max_output_tokens, output_len_dist=output_len_dist)
    if warmup:
        run_sync(serve_load(url, requests[:warmup], model=model, concurrency=warmup,
                            stream=stream, server_cache=server_cache))
    settings = [(None, request_rate)] if request_rate is not None else \
        [(c, None) for c in concurrencies]
    runs = []
    for concurrency, rate in settings:
        hits_before = _cache_hits(url)
        label = f"concurrency {concurrency}" if concurrency else f"{rate} req/s"
        if view is not None:
            view.start(len(requests), label)
        t0 = time.perf_counter()
        result = run_sync(serve_load(url, requests, model=model, concurrency=concurrency,
                                     request_rate=rate, stream=stream,
                                     on_done=view.update if view is not None else None,
                                     seed=seed, server_cache=server_cache))
        ok = [c for c in result.completions if c.error is None]
        if view is not None:
            view.finish()
        hits_after = _cache_hits(url)
        runs.append(summarize(ok, result.duration_s or
                              time.perf_counter() - t0, name="serve", concurrency=concurrency,
                              request_rate=rate, failed=len(result.completions) - len(ok),
                              max_in_flight=result.max_in_flight, stream=stream,
                              server_cache=server_cache,
                              cache_hits=None if hits_before is None or hits_after is None
                              else hits_after - hits_before))
    doc = bench_document("serve", runs, engine=info["engine"], model=model, url=url)
    if json_path is not None:
        write_json(doc, json_path)
    return doc
