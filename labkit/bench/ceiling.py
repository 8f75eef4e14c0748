"""The load generator's own ceiling, so that a load test says when it measured the client.

``measure_ceiling`` drives the zero-compute fake server (``labkit.bench.fake_server`` with no
delays: every answer is ready at once) with many closed-loop clients and reports the requests/s
and output tokens/s the load generator reached. A real run that gets close to that measured the
client, not the server: ``mark_client_bound`` flags every run above ``CLIENT_BOUND_FRACTION`` of
the ceiling (``client_bound: true`` in the bench JSON, a warning from ``labkit bench serve``).

Where the server runs matters: in its own process (``in_process=False``, like a real server)
the client has a core to itself; on a thread of the client's process (``in_process=True``, as
in the labs, where the server is a ``BackgroundServer`` of the kernel) the two share one
interpreter, and the ceiling is lower. Measure it the way the real runs are set up.

    python -m labkit.bench.ceiling [--output-tokens 16] [--in-process]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

from labkit.processes import stop_process

CLIENT_BOUND_FRACTION = 0.7  # a run above this share of the ceiling measured the client


@contextlib.contextmanager
def zero_compute_server(in_process: bool = False) -> Iterator[str]:
    """The fake server with no delays, on a thread here or in a child process; yields its URL
    and stops it on exit."""
    from labkit.bench.fake_server import FakeServer

    if in_process:
        with FakeServer(ttft_s=0.0, itl_s=0.0) as server:
            yield server.url
        return
    import httpx

    from labkit.serving.redis_server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "labkit.bench.fake_server", "--port",
                             str(port), "--ttft-ms", "0", "--itl-ms", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError("the zero-compute server exited: "
                                   + proc.stderr.read().decode(errors="replace")[-500:])
            try:
                httpx.get(url + "/health", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the zero-compute server did not answer on {url} "
                                       "within 60 s") from None
                time.sleep(0.05)
        yield url
    finally:
        stop_process(proc, 10)


def measure_ceiling(output_tokens: int = 16, *, num_requests: int = 400, concurrency: int = 32,
                    stream: bool = True, in_process: bool = False) -> dict:
    """Requests/s and output tokens/s of the load generator against the zero-compute server:
    ``num_requests`` requests of ``output_tokens`` tokens from ``concurrency`` closed-loop
    clients (after a warm-up of ``concurrency`` requests). Returns ``requests_per_s``,
    ``output_tokens_per_s``, the settings and ``cpu_count`` (cores this process may use)."""
    from labkit.bench.client import serve_load
    from labkit.bench.fake_server import MODEL
    from labkit.bench.loadgen import run_sync
    from labkit.bench.workloads import short_workload

    workload = short_workload(num_requests, output_tokens)
    with zero_compute_server(in_process) as url:
        run_sync(serve_load(url, workload[:concurrency], model=MODEL, concurrency=concurrency,
                            stream=stream))
        result = run_sync(serve_load(url, workload, model=MODEL, concurrency=concurrency,
                                     stream=stream))
    failed = sum(c.error is not None for c in result.completions)
    if failed:
        raise RuntimeError(f"{failed} of {num_requests} requests to the zero-compute server "
                           "failed; the ceiling is not measured")
    tokens = sum(c.output_tokens for c in result.completions)
    return {"requests_per_s": num_requests / result.duration_s,
            "output_tokens_per_s": tokens / result.duration_s,
            "output_tokens": output_tokens, "num_requests": num_requests,
            "concurrency": concurrency, "stream": stream, "in_process": in_process,
            "cpu_count": len(os.sched_getaffinity(0))}


def ceiling_fraction(run: dict, ceiling: dict) -> float:
    """How close a run came to the load generator's ceiling: the larger of its requests/s and
    its output tokens/s as a share of the ceiling's."""
    return max(run["requests_per_s"] / ceiling["requests_per_s"],
               run["output_tokens_per_s"] / ceiling["output_tokens_per_s"])


def mark_client_bound(runs: Sequence[dict], ceiling: dict,
                      fraction: float = CLIENT_BOUND_FRACTION) -> list[dict]:
    """Add ``client_ceiling_fraction`` and ``client_bound`` (above ``fraction`` of the ceiling)
    to each run, in place; returns the runs that are client-bound."""
    bound = []
    for run in runs:
        run["client_ceiling_fraction"] = ceiling_fraction(run, ceiling)
        run["client_bound"] = run["client_ceiling_fraction"] > fraction
        if run["client_bound"]:
            bound.append(run)
    return bound


def main(argv: list[str] | None = None) -> None:
    """``python -m labkit.bench.ceiling``: print the ceiling as JSON."""
    p = argparse.ArgumentParser(prog="python -m labkit.bench.ceiling",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--output-tokens", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--in-process", action="store_true", help="server on a thread of this process")
    args = p.parse_args(argv)
    print(json.dumps(measure_ceiling(args.output_tokens, num_requests=args.num_requests,
                                     concurrency=args.concurrency, in_process=args.in_process),
                     indent=2))


if __name__ == "__main__":
    main()
