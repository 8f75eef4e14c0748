"""``build_service``: an engine, the exact Redis cache and a batcher wired into an
``InferenceService``: what ``labkit serve`` (``labkit.serving.http.serve``) and every Ray Serve
replica (``labkit.serving.replica``) run.
"""

from __future__ import annotations

from collections.abc import Callable

from labkit.config import DEFAULT_MODEL
from labkit.engines import Engine, ProcessEngine, get_engine
from labkit.serving.batchers import MAX_BATCH_SIZE, MAX_QUEUE, MAX_WAIT_MS, Batcher
from labkit.serving.cache import AsyncResponseCache
from labkit.serving.service import DEADLINE_S, InferenceService, choose_batcher


def build_service(engine: str | Engine = "auto", model: str = DEFAULT_MODEL, cache: bool = True,
                  *, redis_url: str | None = None,
                  batcher: Callable[[Engine], Batcher] | None = None,
                  max_batch_size: int = MAX_BATCH_SIZE, max_wait_ms: float = MAX_WAIT_MS,
                  max_queue: int = MAX_QUEUE, deadline_s: float | None = DEADLINE_S,
                  warmup: bool = True, engine_process: bool = False,
                  **engine_kwargs) -> InferenceService:
    """An engine (a name for ``get_engine`` or an Engine) behind an ``InferenceService``, with
    the exact Redis cache (embedded server unless ``redis_url``/``$REDIS_URL``) when ``cache``.

    ``batcher``: a function of the engine that builds the batcher (a replica passes one that
    builds a ``ServeBatcher``); default ``choose_batcher`` with ``max_batch_size`` (requests),
    ``max_wait_ms`` and ``max_queue``. ``deadline_s``: a request's generation stops this long
    after it arrived (None: never). ``warmup``: run the engine once before serving.
    ``engine_process``: build the named engine in a process of its own (``ProcessEngine``), so
    the server's event loop and the engine's step loop do not share one GIL.
    """
    if isinstance(engine, Engine):
        eng = engine
    elif engine_process:
        eng = ProcessEngine(engine, model, **engine_kwargs)
    else:
        eng = get_engine(engine, model=model, **engine_kwargs)
    if warmup:
        eng.warmup()
    chosen = batcher(eng) if batcher is not None else choose_batcher(
        eng, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue)
    response_cache = AsyncResponseCache(model, "redis", url=redis_url) if cache else None
    return InferenceService(eng, response_cache, batcher=chosen, model_name=model,
                            deadline_s=deadline_s)
