"""Scale out: ``InferenceService`` replicas behind Ray Serve, one Redis key space for all of them.

``deploy()`` starts (or joins) Ray, starts Serve's HTTP proxy on ``127.0.0.1:http_port``, starts
one embedded Redis server in this (driver) process, and runs ``replicas`` copies of the service.
Each replica builds its own engine and ``InferenceService`` (``labkit.http.build_service``) and
serves ``labkit.http.create_app``'s OpenAI-compatible routes through Serve's FastAPI ingress,
so ``openai.AsyncOpenAI(base_url=deployment.base_url)`` works unchanged. The proxy spreads
requests over replicas; every replica reads and writes the same Redis with the same sha256
keys, so an answer generated on one replica is a cache hit on the others (``hash()`` keys would
differ per process and every replica would miss).

Each HTTP response carries ``x-labkit-replica`` (the replica that served it), and each replica
writes its ``service.metrics()`` (plus pid) to a Redis hash after every response, so
``ServeDeployment.replica_metrics()`` reads per-replica counters without racing the router.

Ray Serve knobs used (Ray 2.x): ``max_ongoing_requests`` (the most requests one replica is
sent at once; the old ``max_concurrent_queries`` was removed and is now a TypeError),
``autoscaling_config`` (``min_replicas``, ``max_replicas``, ``target_ongoing_requests``,
``upscale_delay_s``, ``downscale_delay_s``), ``ray_actor_options`` (``num_gpus=1``: one replica
per GPU; fractional ``num_cpus`` on a CPU) and ``@serve.batch`` (``batcher="serve"``: Serve's
batcher instead of labkit's ``DynamicBatcher``). A replica never holds more than
``max_ongoing_requests`` requests, so no batcher inside it can form a larger batch.

Ray, Serve, FastAPI and redis are imported inside functions: ``import labkit.scale`` is cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from labkit.config import DEFAULT_MODEL, choose

BATCHERS = ("labkit", "serve")
REPLICA_HEADER = "x-labkit-replica"
APP_NAME = "labkit"
DEPLOYMENT_NAME = "LabkitReplica"
AUTOSCALING_METRICS_INTERVAL_S = 1.0  # load reports to the autoscaler (Ray's default: 10 s)
_serve_http: tuple[str, int] | None = None  # (host, port) of the Serve proxy deploy() started


def board_key(app_name: str) -> str:
    """The Redis hash where each replica of ``app_name`` publishes its metrics (JSON per field)."""
    return f"labkit-serve:{app_name}:replicas"


# --- the replica ---------------------------------------------------------------------------------
class ServeBatchService:
    """``InferenceService``'s request path with Ray Serve's ``@serve.batch`` as the batcher.

    cache lookup -> ``serve.batch`` queue (``max_batch_size``, ``batch_wait_timeout_s``) -> one
    ``engine.generate(batch)`` in a worker thread -> cache store. It answers ``handle``,
    ``stream`` (the whole text as one event: ``serve.batch`` returns finished results),
    ``metrics`` and ``aclose`` like ``InferenceService``, so ``labkit.http.create_app`` serves it.
    Must be built inside a Serve replica (``serve.batch`` reads the replica's config).
    """

    def __init__(self, engine, cache=None, *, model_name: str | None = None,
                 max_batch_size: int = 16, max_wait_ms: float = 10.0) -> None:
        from ray import serve

        self.engine, self.cache = engine, cache
        self.model_name = model_name or engine.model_name
        self.max_batch_size, self.max_wait_ms = max_batch_size, max_wait_ms
        self.batch_sizes: list[int] = []
        self.counts = {"requests": 0, "completed": 0, "cache_hits": 0, "cache_misses": 0}
        self._latency_s: list[float] = []
        self._batched = serve.batch(max_batch_size=max_batch_size,
                                    batch_wait_timeout_s=max_wait_ms / 1000)(self._run_batch)

    async def _run_batch(self, requests: list) -> list:
        self.batch_sizes.append(len(requests))
        return await asyncio.to_thread(self.engine.generate, requests)

    async def handle(self, request, on_delta=None, *, use_cache: bool = True):
        from labkit.cache import completion_from_value
        from labkit.engines.base import now
        from labkit.service import ServiceResponse

        t0 = now()
        self.counts["requests"] += 1
        cache = self.cache if use_cache else None
        value = await cache.get(request) if cache is not None else None
        if value is not None:
            self.counts["cache_hits"] += 1
            completion = completion_from_value(request.request_id, value, t0, now())
            hit = True
        else:
            if cache is not None and cache.cacheable(request):
                self.counts["cache_misses"] += 1
            completion = await self._batched(request)
            if cache is not None:
                await cache.put(request, completion)
            hit = False
        end = now()
        self.counts["completed"] += 1
        self._latency_s.append(end - t0)
        if on_delta is not None and completion.text:
            on_delta(completion.text, end)
        return ServiceResponse(request.request_id, completion.text, completion, end - t0, hit)

    async def stream(self, request, *, use_cache: bool = True):
        from labkit.engines.base import now
        from labkit.service import StreamEvent

        response = await self.handle(request, use_cache=use_cache)
        if response.text:
            yield StreamEvent(response.text, response.completion.end_s)
        yield StreamEvent("", now(), response)

    def metrics(self) -> dict:
        """Counters, cache hit ratio, Serve batch sizes and latency percentiles (s)."""
        from collections import Counter

        from labkit.metrics import stats

        n, looked = len(self.batch_sizes), self.counts["cache_hits"] + self.counts["cache_misses"]
        return {"model": self.model_name, "engine": getattr(self.engine, "name", "?"),
                **self.counts, "cache_enabled": self.cache is not None,
                "cache_hit_ratio": self.counts["cache_hits"] / looked if looked else None,
                "batching": {"mode": "serve.batch", "max_batch_size": self.max_batch_size,
                             "max_wait_ms": self.max_wait_ms, "batches": n,
                             "requests": sum(self.batch_sizes),
                             "mean_batch_size": sum(self.batch_sizes) / n if n else 0.0,
                             "batch_size_counts": dict(sorted(Counter(self.batch_sizes).items()))},
                "latency_s": stats(self._latency_s)}

    async def aclose(self) -> None:
        closer = getattr(self.cache, "aclose", None)
        if closer is not None:
            await closer()


class _ReplicaTag:
    """ASGI middleware: add ``x-labkit-replica`` to every response and publish the replica's
    metrics to Redis before the last body chunk leaves (so a client that got its answer reads
    up-to-date counters)."""

    def __init__(self, app, replica, publish) -> None:
        self.app, self.replica, self.publish = app, replica, publish

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (REPLICA_HEADER.encode(), self.replica.encode())]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                await self.publish()
            await send(message)

        await self.app(scope, receive, tagged)


class LabkitReplica:
    """One Serve replica: an engine, a service (labkit or Serve batcher), the OpenAI routes."""

    def __init__(self, model: str, engine, redis_url: str | None, cache: bool, batcher: str,
                 max_batch_size: int, max_wait_ms: float, max_queue: int, torch_threads: int | None,
                 engine_kwargs: dict) -> None:
        from ray import serve

        from labkit.http import build_service

        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.model, self.redis_url = model, redis_url
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.app_name = serve.get_replica_context().app_name
        eng = engine() if callable(engine) else engine
        if batcher == "labkit":
            self.service = build_service(eng, model, cache, redis_url=redis_url,
                                         max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                                         max_queue=max_queue, **engine_kwargs)
        else:
            from labkit.cache import AsyncResponseCache
            from labkit.engines import get_engine

            if isinstance(eng, str):
                eng = get_engine(eng, model=model, **engine_kwargs)
            eng.warmup()
            self.service = ServeBatchService(
                eng, AsyncResponseCache(model, "redis", url=redis_url) if cache else None,
                model_name=model, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
        self._board = None

    async def publish(self) -> None:
        """Write this replica's metrics (and pid) to the Redis board; never fails a request."""
        if self.redis_url is None:
            return
        if self._board is None:
            from labkit.redis_server import get_client

            self._board = get_client(self.redis_url, asyncio=True)
        record = {**self.service.metrics(), "replica": self.replica, "pid": os.getpid(),
                  "published_unix_s": time.time()}
        try:
            await self._board.hset(board_key(self.app_name), self.replica, json.dumps(record))
        except Exception:  # noqa: BLE001 (metrics are best effort; the answer still goes out)
            pass

    async def __serve_build_asgi_app__(self):
        from labkit.http import create_app

        app = create_app(self.service, self.model)
        app.add_middleware(_ReplicaTag, replica=self.replica, publish=self.publish)
        await self.publish()
        return app


# --- deploy and shut down ------------------------------------------------------------------------
@dataclass
class ServeDeployment:
    """A running deployment: URLs, the Redis it shares, and the processes it started."""

    url: str  # Serve's HTTP proxy, e.g. http://127.0.0.1:8000
    model: str
    app_name: str
    redis_url: str | None
    handle: object = None  # the Serve DeploymentHandle of the ingress
    redis: object = None  # the EmbeddedRedis this driver started (None: a shared REDIS_URL)
    owns_ray: bool = False
    config: dict = field(default_factory=dict)
    pids: set[int] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        """OpenAI base URL (``.../v1``)."""
        return self.url + "/v1"

    def replica_metrics(self) -> dict[str, dict]:
        """``{replica_id: service metrics + pid}`` as each replica last published them."""
        from labkit.redis_server import get_client

        client = get_client(self.redis_url)
        try:
            raw = client.hgetall(board_key(self.app_name))
        finally:
            client.close()
        return {k.decode() if isinstance(k, bytes) else k: json.loads(v) for k, v in raw.items()}

    def replica_states(self) -> dict[str, int]:
        """Replicas per state now, e.g. ``{"RUNNING": 1, "STARTING": 1}`` (from serve.status)."""
        from ray import serve

        app = serve.status().applications.get(self.app_name)
        dep = app.deployments.get(DEPLOYMENT_NAME) if app else None
        return {str(k): int(v) for k, v in dep.replica_states.items()} if dep else {}

    def running_replicas(self) -> int:
        """Replicas in state RUNNING now (serving requests)."""
        return self.replica_states().get("RUNNING", 0)

    def shutdown(self) -> list[int]:
        """Stop Serve, Ray (if ``deploy`` started it) and the embedded Redis; return the pids of
        processes this deployment started that are still alive (empty when all is clean)."""
        self.pids |= ray_processes() | {p for p in (getattr(self.redis, "pid", None),) if p}
        self.pids |= {m["pid"] for m in _safe(self.replica_metrics, {}).values() if "pid" in m}
        import ray
        from ray import serve

        global _serve_http
        try:
            if self.owns_ray:
                serve.shutdown()
                _serve_http = None
            else:  # keep Serve's controller and proxy for the next deploy; stop_ray() ends them
                serve.delete(self.app_name)
        finally:
            if self.owns_ray:
                ray.shutdown()
            if self.redis is not None:
                self.redis.stop()
        return wait_gone(self.pids) if self.owns_ray else []

    def __enter__(self) -> ServeDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def deploy(model: str = DEFAULT_MODEL, engine: str | Callable = "hf", replicas: int = 2, *,
           num_gpus_per_replica: float | None = None, num_cpus_per_replica: float | None = None,
           max_ongoing_requests: int = 32, max_queued_requests: int = -1,
           autoscaling: Mapping | None = None, redis_url: str | None = None, cache: bool = True,
           batcher: str = "labkit", max_batch_size: int = 16, max_wait_ms: float = 10.0,
           max_queue: int = 1024, host: str = "127.0.0.1", http_port: int | None = None,
           app_name: str = APP_NAME, ray_num_cpus: int | None = None,
           engine_kwargs: Mapping | None = None) -> ServeDeployment:
    """Run ``replicas`` copies of the service on Ray Serve; returns a ``ServeDeployment``.

    ``engine``: a ``get_engine`` name or a zero-argument factory (run in each replica).
    ``num_gpus_per_replica``: default 1 where CUDA is visible (one replica per GPU), else 0.
    ``num_cpus_per_replica``: default ``ray_num_cpus / max replicas`` on a CPU, so all fit.
    ``autoscaling``: a Serve ``autoscaling_config`` dict (``min_replicas``, ``max_replicas``,
    ``target_ongoing_requests``, ...); then ``replicas`` is ignored. Unless it says otherwise,
    handles and replicas report their load every ``AUTOSCALING_METRICS_INTERVAL_S`` (1 s) instead
    of Ray's 10 s, so a short lab can see the autoscaler react (Ray 2.60 reads this interval from
    the config's ``metrics_interval_s``, which it marks deprecated in favour of environment
    variables that its router and replicas do not read yet). ``redis_url``: a shared
    server; None starts one embedded Redis here for all replicas. ``batcher``: ``"labkit"``
    (``DynamicBatcher``) or ``"serve"`` (``@serve.batch``); both use ``max_batch_size`` and
    ``max_wait_ms``. Ray is started here (``ray_num_cpus`` logical CPUs, no dashboard) unless
    it is already running (``start_ray``); then ``shutdown()`` deletes only this application
    and later deployments reuse Serve's proxy (same port) until ``stop_ray()``. A Redis server
    is always used: the cache (``cache=True``) and the board replicas publish metrics to.
    """
    import ray
    from ray import serve

    from labkit.redis_server import EmbeddedRedis, free_port, get_client

    choose(batcher, BATCHERS, "batcher")
    if replicas < 1 or max_ongoing_requests < 1:
        raise ValueError(f"need replicas >= 1 and max_ongoing_requests >= 1, got {replicas!r}, "
                         f"{max_ongoing_requests!r}")
    if num_gpus_per_replica is None:
        from labkit.device import has_cuda

        num_gpus_per_replica = 1 if has_cuda() else 0
    most = int(autoscaling["max_replicas"]) if autoscaling else replicas
    owns_ray = not ray.is_initialized()
    if owns_ray:
        start_ray(ray_num_cpus)
    if num_cpus_per_replica is None:
        cpus = ray.cluster_resources().get("CPU", 1.0)
        num_cpus_per_replica = 1 if num_gpus_per_replica else cpus / most
    server = None
    redis_url = redis_url or os.environ.get("REDIS_URL")
    if redis_url is None:  # the cache (if on) and the replicas' metrics board
        server = EmbeddedRedis().start()
        redis_url = server.url
    board = get_client(redis_url)
    try:
        board.delete(board_key(app_name))  # a shared server may hold an earlier run's replicas
    finally:
        board.close()
    global _serve_http
    if _serve_http is not None and http_port not in (None, _serve_http[1]):
        raise ValueError(f"Serve already listens on port {_serve_http[1]}; got http_port="
                         f"{http_port!r} (stop_ray() first to change it)")
    host, port = _serve_http or (host, http_port or free_port())
    threads = None if num_gpus_per_replica else max(1, int(num_cpus_per_replica))
    options = {"max_ongoing_requests": max_ongoing_requests,
               "max_queued_requests": max_queued_requests,
               "ray_actor_options": {"num_cpus": num_cpus_per_replica,
                                     "num_gpus": num_gpus_per_replica}}
    if autoscaling:
        from ray.serve.config import AutoscalingConfig

        with _quiet_autoscaling_config():
            options["autoscaling_config"] = AutoscalingConfig(
                **{"metrics_interval_s": AUTOSCALING_METRICS_INTERVAL_S, **autoscaling})
    else:
        options["num_replicas"] = replicas
    try:
        if _serve_http is None:
            serve.start(http_options={"host": host, "port": port})
            _serve_http = (host, port)
        with _quiet_autoscaling_config():
            cls = serve.deployment(serve.ingress()(LabkitReplica), name=DEPLOYMENT_NAME,
                                   **options)
            app = cls.bind(model, engine, redis_url, cache, batcher, max_batch_size,
                           max_wait_ms, max_queue, threads, dict(engine_kwargs or {}))
            handle = serve.run(app, name=app_name, route_prefix="/")
    except BaseException:
        if owns_ray:
            _safe(serve.shutdown)
            _serve_http = None
            ray.shutdown()
        if server is not None:
            server.stop()
        raise
    config = {"replicas": None if autoscaling else replicas, "autoscaling": autoscaling,
              "batcher": batcher, "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms,
              "max_ongoing_requests": max_ongoing_requests,
              "num_cpus_per_replica": num_cpus_per_replica,
              "num_gpus_per_replica": num_gpus_per_replica, "engine": str(engine)}
    return ServeDeployment(f"http://{host}:{port}", model, app_name, redis_url, handle, server,
                           owns_ray, config, ray_processes() if owns_ray else set())


# --- autoscaling under a load step ---------------------------------------------------------------
async def load_step(dep: ServeDeployment, requests, *, low: int = 1, high: int = 8,
                    step_at_s: float = 5.0, step_for_s: float = 25.0, total_s: float = 40.0,
                    sample_every_s: float = 1.0) -> dict:
    """Closed-loop load of ``low`` clients, raised to ``high`` clients from ``step_at_s`` for
    ``step_for_s`` seconds, for ``total_s`` seconds in all; requests cycle through ``requests``.

    Returns ``{"samples": [(t_s, running, starting)], "requests": [(t_done_s, e2e_s, phase)],
    ...}`` with times in seconds from the start (``phase``: ``"low"`` or ``"step"``). Replica
    counts (RUNNING, and STARTING: decided but still loading) come from ``serve.status()``
    every ``sample_every_s``.
    """
    import itertools

    from labkit.engines.base import now
    from labkit.serve_bench import load_sender

    cycle = itertools.cycle(requests)
    done: list[tuple[float, float, str]] = []
    samples: list[tuple[float, int]] = []
    async with load_sender(dep.url, dep.model, in_flight=high, timeout_s=300.0) as send:
        t0 = now()

        async def user(start_s: float, stop_s: float, phase: str) -> None:
            await asyncio.sleep(start_s)
            while now() - t0 < stop_s:
                c = await send(next(cycle))
                if c.error is None:
                    done.append((c.end_s - t0, c.e2e_s, phase))

        async def sampler() -> None:
            while now() - t0 < total_s:
                states = await asyncio.to_thread(dep.replica_states)
                samples.append((now() - t0, states.get("RUNNING", 0),
                                states.get("STARTING", 0)))
                await asyncio.sleep(sample_every_s)

        users = [user(0.0, total_s, "low") for _ in range(low)]
        users += [user(step_at_s, step_at_s + step_for_s, "step") for _ in range(high - low)]
        await asyncio.gather(sampler(), *users)
    return {"samples": samples, "requests": done, "low": low, "high": high,
            "step_at_s": step_at_s, "step_for_s": step_for_s, "total_s": total_s}


def plot_load_step(trace: dict):
    """Two panels over time (s): replicas (running; running + starting), and each request's
    E2E latency (s)."""
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 4.8), sharex=True, layout="constrained")
    ts, running, starting = zip(*trace["samples"]) if trace["samples"] else ((), (), ())
    top.step(ts, running, where="post", label="running")
    top.step(ts, [r + s for r, s in zip(running, starting)], "--", where="post",
             label="running + starting")
    top.set_ylabel("replicas (count)")
    top.set_ylim(0, max(running + starting or (1,)) + 1.5)
    for ax in (top, bottom):
        ax.axvspan(trace["step_at_s"], trace["step_at_s"] + trace["step_for_s"], alpha=0.12,
                   label=f"load step: {trace['low']} -> {trace['high']} clients")
        ax.grid(True, alpha=0.3)
    if trace["requests"]:
        t_done, e2e, _ = zip(*trace["requests"])
        bottom.plot(t_done, e2e, ".", label="one request")
    bottom.set_xlabel("time since the load started (s)")
    bottom.set_ylabel("E2E latency (s)")
    top.legend(loc="upper left")
    return fig


def serve_ray(model: str = DEFAULT_MODEL, engine: str = "auto", replicas: int = 2,
              host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    """``labkit serve --ray --replicas N``: deploy, print the URL, block until Ctrl-C, shut down.

    Binds ``127.0.0.1`` by default (no authentication: ``0.0.0.0`` only on a trusted network).
    """
    from labkit.engines import resolve_engine

    dep = deploy(model, resolve_engine(engine), replicas, host=host, http_port=port, **kwargs)
    print(f"labkit serve --ray: {model}, {replicas} replica(s); OpenAI base URL {dep.base_url}"
          f"; Redis {dep.redis_url}. Ctrl-C stops.", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopping Serve, Ray and Redis ...", flush=True)
    finally:
        left = dep.shutdown()
        if left:
            print(f"warning: processes still alive after shutdown: {sorted(left)}", flush=True)


def start_ray(num_cpus: int | None = None) -> set[int]:
    """Start a local Ray (``num_cpus`` logical CPUs, default all; no dashboard); return the pids
    of its processes."""
    import ray

    ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    # Serve's INFO lines ("Deploying app ...", "Application ... is ready") are for operators;
    # the labs print what they measure. Warnings and errors still show. Importing Serve sets
    # its logger up, so import it first.
    from ray import serve  # noqa: F401

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    return ray_processes()


def stop_ray() -> list[int]:
    """Stop Serve and Ray started by ``start_ray``; return pids of Ray processes still alive."""
    import ray
    from ray import serve

    global _serve_http
    pids = ray_processes()
    if ray.is_initialized():
        _safe(serve.shutdown)
        ray.shutdown()
    _serve_http = None
    return wait_gone(pids)


# --- processes -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_autoscaling_config():
    """Setting ``metrics_interval_s`` (see ``deploy``) is the only way Ray 2.60 changes the push
    interval, and Ray warns that the field is deprecated: the warning is not for students."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The `metrics_interval_s` field", DeprecationWarning)
        yield


def _safe(fn, default=None):
    try:
        return fn()
    except Exception:  # noqa: BLE001 (cleanup paths must go on)
        return default


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of a process from /proc, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def descendants(root: int) -> set[int]:
    """Pids of every live process below ``root`` (scans /proc; Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _proc_stat(int(entry.name))) is not None:
            children.setdefault(st[1], []).append(int(entry.name))
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def ray_processes(root: int | None = None) -> set[int]:
    """Live processes below ``root`` (default: this process) whose command line is Ray's or
    Redis's (raylet, gcs_server, ``ray::`` workers, Serve actors, redis-server)."""
    found = set()
    for pid in descendants(root or os.getpid()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8",
                                                                                      "replace")
        except OSError:
            continue
        if any(mark in cmd for mark in ("ray", "gcs_server", "redis-server")):
            found.add(pid)
    return found


def alive(pids) -> set[int]:
    """The pids that still run (zombies, which are dead but not yet reaped, count as gone)."""
    return {p for p in pids if (st := _proc_stat(p)) is not None and st[0] != "Z"}


def wait_gone(pids, timeout_s: float = 20.0) -> list[int]:
    """Wait up to ``timeout_s`` for ``pids`` to exit; return those still alive, sorted."""
    deadline = time.monotonic() + timeout_s
    while (left := alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return sorted(left)
