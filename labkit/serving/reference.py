"""The course page's ``OptimizedInferenceService``, reproduced faithfully (defects included).

This is the reference design of the seed page (``shared/seed/000_...txt``, "Guided Exercise"),
kept as close to the original as labkit allows so that the batching lab can *measure* what is
wrong with it. Do not use it to serve anything: ``labkit.serving.service`` is the fixed design.

Mapping from the seed to labkit (the only changes):

| seed                                                   | here                                   |
|--------------------------------------------------------|----------------------------------------|
| ``@serve.deployment(...)`` (Ray Serve)                 | a plain class (no Ray); the deployment |
|                                                        | options have no effect on the defects  |
| ``vllm.LLM(model=model_id, ...)``                      | ``labkit.engines.get_engine("auto",    |
|                                                        | model=model_id)``, or an Engine given  |
| ``self.model.generate(prompts, SamplingParams(         | ``self.model.generate([Request(prompt= |
| temperature=T, max_tokens=M))``                        | p, max_tokens=M, temperature=T) ...])``|
| ``out.outputs[0].text``                                | ``completion.text``                    |
| ``redis.Redis(host='localhost', port=6379,             | any client with ``get``/``setex`` (the |
| decode_responses=True)``                               | serving lab passes the embedded Redis),|
|                                                        | a ``redis://`` URL, or ``None``: a     |
|                                                        | ``DictCache`` in this process          |

Both calls stay synchronous, as in the seed (vLLM's ``LLM.generate`` and ``redis.Redis`` block).
Every defect is kept and marked ``# DEFECT n:`` where it happens:

1. ``hash()`` keys differ per process (``PYTHONHASHSEED``): no two workers share a cache entry.
2. sampled outputs (temperature 0.7) are cached: one random sample is frozen for an hour.
3. the event loop is blocked by the synchronous ``generate`` and Redis calls in ``async def``.
4. the caller that fills the batch gets ``responses[0]``: another request's text.
5. queued requests are generated twice: each was already answered on its own when it arrived,
   and the whole queue is generated again when the batch fills.
6. each request's ``max_tokens`` and ``temperature`` are ignored for the config's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from labkit.engines.base import Engine, Request


# Configuration
@dataclass
class OptimizationConfig:
    """Configuration for optimization settings"""

    batch_size: int = 32
    max_tokens: int = 100
    cache_ttl: int = 3600
    temperature: float = 0.7
    gpu_memory_utilization: float = 0.9


# Request/Response Models
class GenerationRequest(BaseModel):
    prompt: str
    max_tokens: int | None = 100
    temperature: float | None = 0.7


class GenerationResponse(BaseModel):
    text: str
    latency_ms: float
    cache_hit: bool


class DictCache:
    """A stand-in for ``redis.Redis(decode_responses=True)`` with the two methods the seed uses.

    ``get(key) -> str | None`` and ``setex(key, ttl_s, value)``; entries expire after ``ttl_s``
    seconds. It lives in one process, like the seed's Redis on ``localhost`` seen by one worker.
    """

    def __init__(self) -> None:
        self._data: dict[str, tuple[float, str]] = {}

    def get(self, key: str) -> str | None:
        hit = self._data.get(key)
        if hit is None or hit[0] < time.monotonic():
            self._data.pop(key, None)
            return None
        return hit[1]

    def setex(self, key: str, ttl_s: int, value: str) -> bool:
        self._data[key] = (time.monotonic() + ttl_s, str(value))
        return True


def _cache_client(cache: Any) -> Any:
    """A ``get``/``setex`` client: the one given, one for a ``redis://`` URL, or a DictCache."""
    if cache is None:
        return DictCache()
    if isinstance(cache, str):
        import redis

        return redis.Redis.from_url(cache, decode_responses=True)
    if not (hasattr(cache, "get") and hasattr(cache, "setex")):
        raise TypeError(f"cache must be a Redis client (get/setex), a redis:// URL or None; "
                        f"got {type(cache).__name__}")
    return cache


class OptimizedInferenceService:
    """The seed's service (see module doc). ``model_id`` is a model name or a labkit Engine."""

    def __init__(self, model_id: str | Engine, config: OptimizationConfig, cache: Any = None):
        # Initialize the engine (the seed: vllm.LLM(model=model_id, tensor_parallel_size=1,
        # gpu_memory_utilization=config.gpu_memory_utilization))
        if isinstance(model_id, Engine):
            self.model = model_id
        else:
            from labkit.engines import get_engine

            self.model = get_engine("auto", model=model_id)

        # Setup Redis cache (the seed: redis.Redis(host='localhost', port=6379, ...))
        self.cache = _cache_client(cache)

        self.config = config
        self.request_queue = []
        self.logger = logging.getLogger(__name__)

    def _generate_cache_key(self, request: GenerationRequest) -> str:
        """Generate unique cache key for request"""
        # DEFECT 1: hash() of a str is salted per process (PYTHONHASHSEED): every worker and
        # every restart computes different keys, so a shared Redis never hits across them.
        return f"llm:{hash(f'{request.prompt}:{request.max_tokens}:{request.temperature}')}"

    async def _process_batch(self, requests: list[GenerationRequest]) -> list[str]:
        """Process multiple requests in an optimized batch"""
        prompts = [req.prompt for req in requests]
        # DEFECT 6: every request gets the config's temperature and max_tokens; what the caller
        # asked for (request.max_tokens, request.temperature) is ignored.
        sampling = dict(temperature=self.config.temperature, max_tokens=self.config.max_tokens)

        try:
            start_time = time.time()
            # DEFECT 3: a synchronous generate inside async def: the event loop (every other
            # request, the health check, streaming) is frozen until the whole batch finishes.
            outputs = self.model.generate([Request(prompt=p, **sampling) for p in prompts])
            latency = (time.time() - start_time) * 1000

            self.logger.info(
                f"Batch processed {len(prompts)} requests in {latency:.2f}ms"
            )

            return [out.text for out in outputs]

        except Exception as e:
            self.logger.error(f"Batch processing failed: {str(e)}")
            raise

    async def __call__(self, request: GenerationRequest) -> GenerationResponse:
        start_time = time.time()
        cache_key = self._generate_cache_key(request)

        # Check cache
        # DEFECT 3 (again): a synchronous Redis round trip on the event loop.
        if cached := self.cache.get(cache_key):
            latency = (time.time() - start_time) * 1000
            return GenerationResponse(
                text=cached,
                latency_ms=latency,
                cache_hit=True
            )

        # Add to batch queue
        # DEFECT 5: the request stays in the queue even though it is answered on its own below,
        # so when the queue fills it is generated a second time.
        self.request_queue.append(request)

        # Process batch if ready
        if len(self.request_queue) >= self.config.batch_size:
            responses = await self._process_batch(self.request_queue)

            # Cache responses
            for req, resp in zip(self.request_queue, responses):
                cache_key = self._generate_cache_key(req)
                # DEFECT 2: with temperature 0.7 these are random samples; caching one serves
                # the same "random" answer to everyone for cache_ttl seconds.
                self.cache.setex(
                    cache_key,
                    self.config.cache_ttl,
                    resp
                )

            # Clear queue and return response
            self.request_queue.clear()
            latency = (time.time() - start_time) * 1000

            # DEFECT 4: responses[0] belongs to the oldest queued request, not to this caller
            # (this caller's request is the last one in the batch).
            return GenerationResponse(
                text=responses[0],
                latency_ms=latency,
                cache_hit=False
            )

        # Process single request if batch not ready
        responses = await self._process_batch([request])
        latency = (time.time() - start_time) * 1000

        return GenerationResponse(
            text=responses[0],
            latency_ms=latency,
            cache_hit=False
        )


# --- measuring the defects ---------------------------------------------------------------------


