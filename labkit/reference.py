"""The course page's ``OptimizedInferenceService``, reproduced faithfully (defects included).

This is the reference design of the seed page (``shared/seed/000_...txt``, "Guided Exercise"),
kept as close to the original as labkit allows so that the batching lab can *measure* what is
wrong with it. Do not use it to serve anything: ``labkit.service`` is the fixed design.

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

class CountingEngine(Engine):
    """Wraps an engine and counts, per prompt, how often it was generated and how many tokens
    each generation produced (``generations``, ``output_tokens``)."""

    def __init__(self, inner: Engine) -> None:
        super().__init__(inner.model_name, inner.device, inner.dtype)
        self.inner, self.name = inner, inner.name
        self.generations: dict[str, int] = {}
        self.output_tokens: dict[str, list[int]] = {}
        self.batch_sizes: list[int] = []

    def generate(self, requests, on_token=None):
        out = self.inner.generate(requests, on_token)
        self.batch_sizes.append(len(requests))
        for req, completion in zip(requests, out):
            self.generations[req.prompt] = self.generations.get(req.prompt, 0) + 1
            self.output_tokens.setdefault(req.prompt, []).append(completion.output_tokens)
        return out


def measure_reference_defects(engine: Engine, n_requests: int = 8, batch_size: int = 4,
                              max_tokens: int = 8, small_max_tokens: int = 2,
                              tick_ms: float = 10.0, prompts: list[str] | None = None) -> dict:
    """Drive the seed's service with ``n_requests`` concurrent callers and count its defects.

    The service runs greedy (``temperature=0``) so each prompt has one right answer: the
    unbatched output for that prompt alone (computed first). Caller 0 asks for
    ``small_max_tokens`` tokens (its prompt is one whose answer is longer than that).
    Returned (counts are requests unless named otherwise):

    - ``wrong_answers``: callers whose text is not the right answer for their own prompt;
      ``wrong_answer_indices`` says which.
    - ``generations``: engine generations in all; ``duplicate_generations``: generations beyond
      one per request; ``generations_per_request``: their ratio.
    - ``max_loop_stall_ms``: the longest gap (ms) between two ticks of a ``tick_ms`` ticker task
      that runs beside the callers (a free event loop keeps it near ``tick_ms``).
    - ``max_tokens_requested`` / ``tokens_received``: what caller 0 asked for and got.
    """
    import asyncio

    from labkit.bench import load_prompts, run_sync

    if batch_size < 1 or n_requests < 1:
        raise ValueError(f"need n_requests >= 1 and batch_size >= 1, got {n_requests!r}, "
                         f"{batch_size!r}")
    if prompts is None:
        prompts = list(dict.fromkeys(r["prompt"] for r in load_prompts()))
    prompts = list(dict.fromkeys(prompts))[:n_requests]
    if len(prompts) < n_requests:
        raise ValueError(f"need {n_requests} distinct prompts, have {len(prompts)}")
    done = {p: engine.generate([Request(prompt=p, max_tokens=max_tokens)])[0] for p in prompts}
    right = {p: c.text for p, c in done.items()}
    # Caller 0 (the params probe) needs a prompt whose answer is longer than it asks for.
    probe = next((p for p in prompts if done[p].output_tokens > small_max_tokens), None)
    if probe is None:
        raise ValueError(f"no prompt answers with more than small_max_tokens="
                         f"{small_max_tokens} tokens; raise max_tokens={max_tokens}")
    prompts = [probe] + [p for p in prompts if p != probe]
    counting = CountingEngine(engine)
    config = OptimizationConfig(batch_size=batch_size, max_tokens=max_tokens, temperature=0.0)
    service = OptimizedInferenceService(counting, config)
    requests = [GenerationRequest(prompt=p, max_tokens=small_max_tokens if i == 0 else max_tokens,
                                  temperature=0.0) for i, p in enumerate(prompts)]

    async def main():
        ticks = [time.perf_counter()]

        async def ticker():
            while True:
                await asyncio.sleep(tick_ms / 1000)
                ticks.append(time.perf_counter())

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)  # the ticker is running before the first caller arrives
        responses = await asyncio.gather(*(service(r) for r in requests))
        await asyncio.sleep(2 * tick_ms / 1000)
        task.cancel()
        return responses, max(b - a for a, b in zip(ticks, ticks[1:]))

    responses, max_gap_s = run_sync(main())
    wrong = [i for i, (req, resp) in enumerate(zip(requests, responses))
             if resp.text != right[req.prompt]]
    generations = sum(counting.generations.values())
    return {
        "n_requests": n_requests, "batch_size": batch_size,
        "wrong_answers": len(wrong), "wrong_answer_indices": wrong,
        "generations": generations, "duplicate_generations": generations - n_requests,
        "generations_per_request": generations / n_requests,
        "engine_batch_sizes": counting.batch_sizes,
        "tick_ms": tick_ms, "max_loop_stall_ms": max_gap_s * 1000,
        "max_tokens_requested": small_max_tokens,
        "tokens_received": counting.output_tokens[prompts[0]][0],
    }
