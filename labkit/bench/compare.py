"""The course page's reference service measured: its defects, and against ``InferenceService``.

- ``measure_reference_defects``: the seed service (``labkit.serving.reference``) under concurrent
  callers: answers given to the wrong caller, duplicate generations, a blocked event loop, a
  caller's ``max_tokens`` ignored, each counted.
- ``compare_naive_and_fixed``: the same requests through the seed service and the fixed one:
  throughput, latency and wrong answers side by side.
- ``service_vs_offline``: what the service's request path costs against one offline batch.

Used by the batching lab (lab 02) and the serving lab (lab 05).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from labkit.engines.base import Engine, Request, now
from labkit.engines.counting import CountingEngine
from labkit.serving.reference import (
    GenerationRequest,
    OptimizationConfig,
    OptimizedInferenceService,
)


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

    from labkit.bench.loadgen import run_sync
    from labkit.bench.workloads import load_prompts

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


@dataclass
class _Answer:
    """A naive-service answer shaped for ``summarize``: no stream, so TTFT = E2E."""

    request_id: str
    text: str
    output_tokens: int
    start_s: float
    end_s: float
    token_times_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    tpot_s: float | None = None

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def ttft_s(self) -> float:
        return self.e2e_s


def expected_texts(engine, requests: Sequence[Request]) -> dict[str, str]:
    """Each request's own unbatched greedy text, by request id (one engine call per prompt at
    the longest ``max_tokens``; shorter requests take a prefix of its tokens)."""
    longest: dict[str, int] = {}
    for r in requests:
        longest[r.prompt] = max(longest.get(r.prompt, 0), r.max_tokens)
    tokens = {p: engine.generate([Request(prompt=p, max_tokens=m)])[0].token_ids
              for p, m in longest.items()}
    return {r.request_id: engine.tokenizer.decode(tokens[r.prompt][:r.max_tokens],
                                                  skip_special_tokens=True) for r in requests}


async def compare_naive_and_fixed(engine, requests: Sequence[Request], concurrency: int, *,
                                  batch_size: int = 4, cache_factory=None) -> list[dict]:
    """The same closed-loop load through the course's reference service and ``InferenceService``.

    Returns one row per design: requests/s, E2E and TTFT p50/p99 (s), ``engine_requests`` (rows
    the engine generated: more than the requests means duplicates), ``wrong`` (answers that are
    not the request's own unbatched greedy text; a fixed-service answer that parts from it at a
    floating-point near-tie would also count, and is rare). Requests must be greedy prompts.
    """
    from labkit.bench.loadgen import closed_loop
    from labkit.metrics import summarize
    from labkit.serving.reference import (
        GenerationRequest,
        OptimizationConfig,
        OptimizedInferenceService,
    )
    from labkit.serving.service import InferenceService

    expected = expected_texts(engine, requests)
    rows = []
    counted = CountingEngine(engine)
    naive = OptimizedInferenceService(counted, OptimizationConfig(
        batch_size=batch_size, max_tokens=max(r.max_tokens for r in requests), temperature=0.0))

    async def send_naive(r: Request) -> _Answer:
        t0 = now()
        out = await naive(GenerationRequest(prompt=r.prompt, max_tokens=r.max_tokens,
                                            temperature=r.temperature))
        n = len(engine.tokenizer(out.text, add_special_tokens=False)["input_ids"])
        return _Answer(r.request_id, out.text, n, t0, now())

    fixed = InferenceService(counted, cache_factory() if cache_factory else None,
                             max_batch_size=batch_size, max_wait_ms=20)

    async def send_fixed(r: Request):
        return await fixed.complete(r)

    for name, send in (("naive (reference)", send_naive), ("fixed (InferenceService)",
                                                            send_fixed)):
        counted.reset()
        result = await closed_loop(send, requests, concurrency)
        run = summarize(result.completions, result.duration_s, name=name, concurrency=concurrency)
        wrong = sum(c.text != expected[r.request_id]
                    for c, r in zip(result.completions, requests))
        rows.append({"design": name, "requests_per_s": run["requests_per_s"],
                     "e2e_p50_s": run["e2e_s"]["p50"], "e2e_p99_s": run["e2e_s"]["p99"],
                     "ttft_p50_s": run["ttft_s"]["p50"], "engine_requests": counted.requests,
                     "requests": len(requests), "wrong": wrong})
    await fixed.aclose()
    return rows


async def service_vs_offline(engine, requests: Sequence[Request], concurrency: int = 16) -> dict:
    """Output tokens/s of ``engine.generate`` in batches of ``concurrency`` (offline) against the
    same requests sent by ``concurrency`` closed-loop clients through ``InferenceService`` (no
    cache, batcher ``max_batch_size=concurrency``). Use ``ignore_eos`` requests: fixed lengths."""
    from labkit.bench.loadgen import closed_loop
    from labkit.serving.service import InferenceService

    engine.generate([dataclasses.replace(r, max_tokens=2) for r in requests[:concurrency]])
    t0 = now()  # (after one untimed warm-up batch of the same shape)
    tokens = 0
    for i in range(0, len(requests), concurrency):
        tokens += sum(c.output_tokens for c in engine.generate(requests[i:i + concurrency]))
    offline = tokens / (now() - t0)
    async with InferenceService(engine, max_batch_size=concurrency, max_wait_ms=20) as service:
        result = await closed_loop(service.complete, requests, concurrency)
        batch = service.metrics()["batching"]["mean_batch_size"]
    served = sum(c.output_tokens for c in result.completions) / result.duration_s
    return {"offline_tokens_per_s": offline, "service_tokens_per_s": served,
            "ratio": served / offline, "concurrency": concurrency,
            "mean_batch_size": batch}
