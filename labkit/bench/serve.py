"""``labkit bench serve``: load an OpenAI-compatible server, closed or open loop, against an SLO.

- closed loop (``--concurrencies 1,4,16``): one run per client count.
- open loop (``--request-rates 1,2,4,8``): one run per offered rate, Poisson arrivals (gamma
  with ``--burstiness B``), each request timed from its scheduled send time; ``--duration-s S``
  sends ``round(rate x S)`` requests per rate, ``--max-concurrency N`` caps requests in flight
  (their wait for a slot counts). ``concurrency`` is null in these runs.
- ``--slo ttft_ms=500,tpot_ms=30[,e2e_ms=..]`` or a preset (``labkit.bench.slo``): every run gets
  ``slo``, ``slo_name``, ``slo_attainment``, ``goodput_requests_per_s`` and
  ``goodput_output_tokens_per_s``; an open-loop sweep gets the ``knee`` (capacity at the SLO).
- ``--gpu-cost-per-hour USD``: ``usd_per_million_output_tokens`` at each run's throughput and
  ``usd_per_million_goodput_tokens`` at its goodput.
- the load generator's ceiling (``labkit.bench.ceiling``) is measured first unless
  ``--no-ceiling``: each run gets ``client_bound`` (above 70% of it) and a warning says so.
"""

from __future__ import annotations

import dataclasses
import sys
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


def _cycled(workload: Sequence[Request], n: int) -> list[Request]:
    """``n`` requests: ``workload`` repeated as needed, each copy with its own request id."""
    return [dataclasses.replace(workload[i % len(workload)],
                                request_id=f"{workload[i % len(workload)].request_id}-{i}")
            for i in range(n)]


def _check_open_loop(request_rates, burstiness, duration_s, max_concurrency) -> None:
    from labkit.bench.loadgen import check_rate

    for rate in request_rates:
        check_rate(rate)
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0 (1 = Poisson), got {burstiness!r}")
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration_s must be > 0 s, got {duration_s!r}")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency!r}")


def run_serve_bench(url: str, concurrencies: Sequence[int] = (1, 4, 16),
                    num_requests: int = 32, model: str | None = None, stream: bool = True,
                    request_rates: Sequence[float] | None = None,
                    json_path: str | Path | None = None, *, burstiness: float = 1.0,
                    duration_s: float | None = None, max_concurrency: int | None = None,
                    slo: str | dict[str, float] | None = None,
                    gpu_cost_per_hour: float | None = None,
                    client_ceiling: bool | dict | None = None, stop_past_knee: bool = False,
                    min_output_tokens: int = 16, max_output_tokens: int = 16,
                    output_len_dist: str = "fixed", seed: int = 0, warmup: int = 2,
                    workload: Sequence[Request] | None = None, view=None,
                    server_cache: bool = False) -> dict:
    """The ``serve`` bench: one run per concurrency (closed loop), or, when ``request_rates`` is
    given, one open-loop run per rate (rising) at ``burstiness``, capped at ``max_concurrency``.

    Requests: ``labkit.bench.workloads.make_workload(num_requests, ...)`` (chat, greedy,
    ``ignore_eos``) unless ``workload`` is given; with ``duration_s`` an open-loop run sends
    ``round(rate * duration_s)`` of them (repeated as needed). ``warmup`` requests are sent first
    and not counted. Each run has the contract's fields plus ``failed`` (requests with an HTTP
    error; the statistics are over the others), ``cache_hits`` (labkit servers: hits during the
    run), ``stream``, ``server_cache``, ``max_in_flight`` and ``mean_in_system`` (requests).
    ``slo``: a preset name, ``--slo`` text or a dict of limits in seconds (``labkit.bench.slo``);
    adds the SLO fields to each run and the ``knee`` to the document of an open-loop sweep
    (``stop_past_knee``: stop after the first rate that misses it). ``gpu_cost_per_hour`` (USD):
    adds the cost fields (``labkit.bench.slo.add_cost``). ``client_ceiling``: True measures the
    load generator's ceiling first, a dict is one measured before (``labkit.bench.ceiling``);
    each run then gets ``client_bound``. Requests bypass a labkit server's response cache unless
    ``server_cache`` (see ``load_sender``), so every run times the model. ``view``: a
    ``labkit.widgets`` live view (its ``start``/``update``/``finish`` are called). Bad settings
    raise ValueError before any request is sent. Writes ``json_path`` if given.
    """
    from labkit.bench.ceiling import mark_client_bound, measure_ceiling
    from labkit.bench.loadgen import run_sync
    from labkit.bench.slo import add_cost, knee_record, meets_at_p99, parse_cost, parse_slo
    from labkit.bench.workloads import make_workload
    from labkit.metrics import bench_document, check_slo, write_json

    open_loop = request_rates is not None
    if open_loop:
        request_rates = sorted(request_rates)
        _check_open_loop(request_rates, burstiness, duration_s, max_concurrency)
    slo_name, slo = parse_slo(slo) if isinstance(slo, str) else (None, slo)
    if slo:
        check_slo(slo)
    if stop_past_knee and not (slo and open_loop):
        raise ValueError("stop_past_knee needs an slo and request_rates")
    if gpu_cost_per_hour is not None:
        gpu_cost_per_hour = parse_cost(gpu_cost_per_hour)
    info = server_info(url)
    model = model or info["model"]
    requests = list(workload) if workload is not None else make_workload(
        num_requests, seed=seed, min_output_tokens=min_output_tokens,
        max_output_tokens=max_output_tokens, output_len_dist=output_len_dist)
    if client_ceiling is True:
        client_ceiling = measure_ceiling(max(r.max_tokens for r in requests), stream=stream)
    if warmup:
        run_sync(serve_load(url, requests[:warmup], model=model, concurrency=warmup,
                            stream=stream, server_cache=server_cache))
    settings = [(None, rate) for rate in request_rates] if open_loop else \
        [(c, None) for c in concurrencies]
    runs = []
    for concurrency, rate in settings:
        load = requests if rate is None or duration_s is None else \
            _cycled(requests, max(2, round(rate * duration_s)))
        hits_before = _cache_hits(url)
        label = f"concurrency {concurrency}" if concurrency else f"{rate} req/s"
        if view is not None:
            view.start(len(load), label)
        t0 = time.perf_counter()
        result = run_sync(serve_load(url, load, model=model, concurrency=concurrency,
                                     request_rate=rate, burstiness=burstiness,
                                     max_concurrency=max_concurrency, stream=stream,
                                     on_done=view.update if view is not None else None,
                                     seed=seed, server_cache=server_cache))
        if view is not None:
            view.finish()
        hits_after = _cache_hits(url)
        run = dataclasses.replace(result, duration_s=result.duration_s or time.perf_counter() - t0
                                  ).summary("serve", slo=slo, stream=stream,
                                            server_cache=server_cache,
                                            cache_hits=None if None in (hits_before, hits_after)
                                            else hits_after - hits_before)
        if slo:
            run["slo_name"] = slo_name
        if gpu_cost_per_hour is not None:
            add_cost(run, gpu_cost_per_hour)
        runs.append(run)
        if stop_past_knee and not meets_at_p99(run, slo):
            break
    extra = {"url": url, "loop": "open" if open_loop else "closed"}
    if client_ceiling:
        mark_client_bound(runs, client_ceiling)
        extra["client_ceiling"] = client_ceiling
    if slo and open_loop:
        extra["knee"] = knee_record(runs, slo, slo_name)
    doc = bench_document("serve", runs, engine=info["engine"], model=model, **extra)
    if json_path is not None:
        write_json(doc, json_path)
    return doc


def add_cli_args(parser) -> None:
    """The ``labkit bench serve`` options (values are checked by ``from_args``, so a bad one is
    a one-line error naming it)."""
    p = parser
    p.add_argument("--url", help="serve: base URL of an OpenAI-compatible server")
    p.add_argument("--request-rates", metavar="R1,R2", help="serve: open loop, one run per "
                   "offered rate (requests/s, e.g. 1,2,4,8; inf: all at once)")
    p.add_argument("--burstiness", default="1", help="serve: gamma shape of the arrival gaps "
                   "(1: Poisson; < 1 burstier, > 1 more even)")
    p.add_argument("--duration-s", help="serve: open loop, round(rate x S) requests per rate "
                   "(default: --num-requests)")
    p.add_argument("--max-concurrency", help="serve: open loop, most requests in flight (their "
                   "wait for a slot counts in their latency)")
    p.add_argument("--slo", help="serve: ttft_ms=500,tpot_ms=30[,e2e_ms=..] or a preset: "
                   "mlperf-8b, mlperf-8b-interactive")
    p.add_argument("--gpu-cost-per-hour", metavar="USD", help="serve: machine price (USD/h) "
                   "for the cost per million output tokens")
    p.add_argument("--no-ceiling", action="store_true", help="serve: skip measuring the load "
                   "generator's ceiling (no client-bound flags)")
    p.add_argument("--no-stream", action="store_true", help="serve: non-streaming requests")
    p.add_argument("--server-cache", action="store_true", help="serve: let a labkit server "
                   "answer repeats from its response cache (default: bypass it, time the model)")


def _positive(text: str, what: str, kind: type = float):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not value > 0:
        unit = "an integer >= 1" if kind is int else "a number > 0"
        raise ValueError(f"{what} must be {unit}, got {text!r}")
    return value


def from_args(args, concurrencies: list[int] | None) -> dict:
    """Run ``labkit bench serve`` from parsed arguments (``add_cli_args`` plus ``--model``,
    ``--num-requests``); warns on stderr about each client-bound run. Returns the document."""
    from labkit.bench.slo import parse_rates

    if not args.url:
        raise ValueError("labkit bench serve needs --url (e.g. http://127.0.0.1:8000)")
    rates = parse_rates(args.request_rates) if args.request_rates else None
    if rates and concurrencies:
        raise ValueError("give --concurrencies (closed loop) or --request-rates (open loop), "
                         "not both")
    extra = {"concurrencies": concurrencies} if concurrencies else {}
    if args.num_requests:
        extra["num_requests"] = args.num_requests
    if args.duration_s is not None:
        extra["duration_s"] = _positive(args.duration_s, "--duration-s (seconds)")
    if args.max_concurrency is not None:
        extra["max_concurrency"] = _positive(args.max_concurrency, "--max-concurrency", int)
    doc = run_serve_bench(args.url, model=args.model, request_rates=rates,
                          burstiness=_positive(args.burstiness, "--burstiness"),
                          slo=args.slo, gpu_cost_per_hour=args.gpu_cost_per_hour,
                          client_ceiling=not args.no_ceiling, stream=not args.no_stream,
                          server_cache=args.server_cache, **extra)
    ceiling = doc.get("client_ceiling")
    for run in doc["runs"]:
        if run.get("client_bound"):
            setting = f"{run['request_rate']} req/s" if run["request_rate"] is not None \
                else f"concurrency {run['concurrency']}"
            print(f"labkit bench serve: client-bound: the run at {setting} reached "
                  f"{run['client_ceiling_fraction']:.0%} of the load generator's ceiling "
                  f"({ceiling['requests_per_s']:.0f} req/s here); it measured the client",
                  file=sys.stderr)
    return doc
