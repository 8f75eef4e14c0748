"""Scale out: ``InferenceService`` replicas behind Ray Serve, one Redis key space for all of them.

``deploy()`` starts (or joins) Ray, starts Serve's HTTP proxy on ``127.0.0.1:http_port``, starts
one embedded Redis server in this (driver) process, and runs ``replicas`` copies of the service
(``labkit.serving.replica.LabkitReplica``). Each replica builds its own engine and
``InferenceService`` (``labkit.serving.build.build_service``) and serves
``labkit.serving.http.create_app``'s OpenAI-compatible routes through Serve's FastAPI ingress,
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
batcher, ``labkit.serving.serve_batcher.ServeBatcher``, instead of labkit's). A replica never
holds more than ``max_ongoing_requests`` requests, so no batcher inside it can form a larger
batch.

Ray, Serve, FastAPI and redis are imported inside functions: ``import labkit.serving.deploy`` is
cheap.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from labkit.config import DEFAULT_MODEL, MAX_BODY_BYTES, choose
from labkit.processes import best_effort, ray_processes, wait_gone
from labkit.serving.batchers import MAX_BATCH_SIZE, MAX_QUEUE, MAX_WAIT_MS
from labkit.serving.replica import LabkitReplica, board_key
from labkit.serving.service import DEADLINE_S

BATCHERS = ("labkit", "serve")
APP_NAME = "labkit"
DEPLOYMENT_NAME = "LabkitReplica"
AUTOSCALING_METRICS_INTERVAL_S = 1.0  # load reports to the autoscaler (Ray's default: 10 s)
_serve_http: tuple[str, int] | None = None  # (host, port) of the Serve proxy deploy() started


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
        from labkit.serving.redis_server import get_client

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
        redis_pid = self.redis.pid if self.redis is not None else None
        self.pids |= ray_processes() | ({redis_pid} if redis_pid else set())
        self.pids |= {m["pid"] for m in best_effort(self.replica_metrics, {}).values()
                      if "pid" in m}
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
           batcher: str = "labkit", max_batch_size: int = MAX_BATCH_SIZE,
           max_wait_ms: float = MAX_WAIT_MS, max_queue: int = MAX_QUEUE,
           deadline_s: float | None = DEADLINE_S, max_body_bytes: int = MAX_BODY_BYTES,
           host: str = "127.0.0.1", http_port: int | None = None,
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
    (``DynamicBatcher``, or ``ContinuousGate`` for a continuous engine) or ``"serve"``
    (``@serve.batch``); both use ``max_batch_size`` and ``max_wait_ms``. ``deadline_s`` (a
    request's generation stops this long after it arrived; None: never) and ``max_body_bytes``
    (larger bodies get a 413) are each replica's, as in ``labkit.serving.http.serve``. Ray is
    started here (``ray_num_cpus`` logical CPUs, no dashboard) unless it is already running
    (``start_ray``); then ``shutdown()`` deletes only this application and later deployments
    reuse Serve's proxy (same port) until ``stop_ray()``. A Redis server is always used: the
    cache (``cache=True``) and the board replicas publish metrics to.
    """
    import ray
    from ray import serve

    from labkit.serving.redis_server import EmbeddedRedis, free_port, get_client

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
                           max_wait_ms, max_queue, threads, dict(engine_kwargs or {}),
                           deadline_s, max_body_bytes)
            handle = serve.run(app, name=app_name, route_prefix="/")
    except BaseException:
        if owns_ray:
            best_effort(serve.shutdown)
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
        best_effort(serve.shutdown)
        ray.shutdown()
    _serve_http = None
    return wait_gone(pids)


# --- Ray's warnings -------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_autoscaling_config():
    """Setting ``metrics_interval_s`` (see ``deploy``) is the only way Ray 2.60 changes the push
    interval, and Ray warns that the field is deprecated: the warning is not for students."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The `metrics_interval_s` field", DeprecationWarning)
        yield


