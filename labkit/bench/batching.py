"""The batching bench: static batches vs the DynamicBatcher vs continuous batching.

Three ways to serve the same requests, each measured with ``labkit.metrics`` (vLLM's metric
definitions, bench JSON contract):

- ``static``: offline, the requests cut into batches of ``batch_size`` and handed to the engine
  one batch after another. A batch is padded to its longest prompt and runs until its longest
  output is done. Latency is counted from the start of the request's own batch.
- ``dynamic``: ``concurrency`` closed-loop clients send through
  ``labkit.serving.batchers.DynamicBatcher`` (batches formed on the fly from whatever is
  waiting, up to ``max_batch_size``, after at most ``max_wait_ms``).
- ``continuous``: ``concurrency`` closed-loop clients send single requests to an engine that
  schedules per decode step (``hf-cb``, ``vllm``): a finished request leaves at once and a new
  one joins at the next step.

Padding is the price of static batches: ``padding_fraction`` counts it for prompts (pad tokens
in the padded prompt matrix) and for decode (slots of rows that already finished).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
from collections.abc import Sequence
from pathlib import Path

from labkit.config import DEFAULT_MODEL
from labkit.engines.base import Engine, Request, now
from labkit.metrics import STATS_KEYS, bench_document, summarize
from labkit.serving.batchers import MAX_BATCH_SIZE, MAX_WAIT_MS, DynamicBatcher

WIDE_OUTPUT = dict(min_output_tokens=4, output_len_dist="lognormal")  # many short, a few long
CONTINUOUS_ENGINES = ("hf-cb", "vllm", "none")  # what runs the continuous runs ("none": skip)


def padding_fraction(lengths: Sequence[int], batch_size: int, sort: bool = False) -> float:
    """Wasted fraction when ``lengths`` are run in batches of ``batch_size`` padded to the longest.

    ``sum over batches of (rows x longest - sum of lengths) / (rows x longest)``, pooled: pad
    tokens / all tokens of the padded matrices. For prompts that is prefill padding; for output
    lengths it is the decode slots of rows that already finished while the batch ran on.
    ``sort=True`` batches the lengths in sorted order (bucketing by length).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if any(n < 0 for n in lengths):
        raise ValueError(f"lengths must be >= 0, got {list(lengths)!r}")
    lengths = sorted(lengths) if sort else list(lengths)
    total = useful = 0
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i:i + batch_size]
        total += len(chunk) * max(chunk)
        useful += sum(chunk)
    return (total - useful) / total if total else 0.0


def prompt_lengths(engine: Engine, requests: Sequence[Request]) -> list[int]:
    """Prompt tokens of each request, tokenized as the engine does (chat template included)."""
    from labkit.engines.base import encode_request

    return [len(encode_request(engine.tokenizer, r)) for r in requests]


def capped_workload(engine: Engine, n: int, max_prompt_tokens: int | None = None,
                    **workload_kwargs) -> list[Request]:
    """``labkit.bench.workloads.make_workload`` (plain prompts) keeping only prompts of at most
    ``max_prompt_tokens`` tokens (None: all). The bundled prompts run from 1 to ~330 tokens; on
    a CPU one long prompt makes a whole static batch pay its padded prefill, which hides the
    decode-side gain this lab measures, so the ci profile caps them."""
    from labkit.bench.workloads import make_workload

    pool = make_workload(4 * n if max_prompt_tokens else n, chat=False, **workload_kwargs)
    if max_prompt_tokens:
        lens = prompt_lengths(engine, pool)
        pool = [r for r, k in zip(pool, lens) if k <= max_prompt_tokens]
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} prompts of <= {max_prompt_tokens} tokens; need {n}")
    lens = [r.max_tokens for r in make_workload(n, **workload_kwargs)]  # the seeded lengths
    return [Request(prompt=r.prompt, max_tokens=k, ignore_eos=True, request_id=f"{r.request_id}c")
            for r, k in zip(pool[:n], lens)]


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


def static_run(engine: Engine, requests: Sequence[Request], batch_size: int,
               sort: bool = False, workload: str = "", max_batches: int | None = None) -> dict:
    """Run ``requests`` offline in static batches of ``batch_size`` (in order, or sorted by
    prompt length with ``sort=True``); one ``"static"`` run of the bench contract.

    ``max_batches`` times only the first ``max_batches`` batches (``num_requests`` then says how
    many ran): batch 1 over hundreds of requests would cost minutes and measure nothing new.

    Extra fields: ``prompt_padding_fraction`` and ``decode_padding_fraction`` (0..1, of the
    batches as run), ``sorted``, ``workload``. On ``torch.cuda.OutOfMemoryError`` the run has
    ``"error": "OOM"`` and NaN metrics, so a sweep can go on.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches!r}")
    reqs = list(requests)[:None if max_batches is None else max_batches * batch_size]
    lens = prompt_lengths(engine, reqs)
    if sort:
        order = sorted(range(len(reqs)), key=lambda i: lens[i])
        reqs, lens = [reqs[i] for i in order], [lens[i] for i in order]
    done = []
    try:
        start = now()
        for i in range(0, len(reqs), batch_size):
            done += engine.generate(reqs[i:i + batch_size])
        duration = now() - start
    except _oom_types():
        import torch

        torch.cuda.empty_cache()
        return _failed_run("static", "OOM", len(reqs), batch_size=batch_size, sorted=sort,
                           workload=workload)
    out_lens = [c.output_tokens for c in done]
    return summarize(done, duration, name="static", batch_size=batch_size, sorted=sort,
                     workload=workload,
                     prompt_padding_fraction=padding_fraction(lens, batch_size),
                     decode_padding_fraction=padding_fraction(out_lens, batch_size))


def static_sweep(engine: Engine, requests: Sequence[Request], batch_sizes: Sequence[int],
                 sort: bool = False, workload: str = "", progress: bool = True,
                 max_batches: int | None = None) -> list[dict]:
    """``static_run`` per batch size (at most ``max_batches`` batches each); a size that runs
    out of GPU memory is recorded as OOM."""
    from tqdm.auto import tqdm

    return [static_run(engine, requests, b, sort=sort, workload=workload, max_batches=max_batches)
            for b in tqdm(list(batch_sizes), desc="static sweep", disable=not progress)]


def dynamic_run(engine: Engine, requests: Sequence[Request], concurrency: int,
                max_batch_size: int = MAX_BATCH_SIZE, max_wait_ms: float = MAX_WAIT_MS,
                workload: str = "") -> dict:
    """``concurrency`` closed-loop clients through a ``DynamicBatcher``: one ``"dynamic"`` run.

    Extra fields: ``max_batch_size``, ``max_wait_ms``, ``mean_batch_size`` (requests per engine
    call), ``workload``. TTFT and E2E count from when the client sent the request.
    """
    from labkit.bench.loadgen import closed_loop, run_sync

    async def main():
        async with DynamicBatcher(engine, max_batch_size=max_batch_size,
                                  max_wait_ms=max_wait_ms) as batcher:
            result = await closed_loop(batcher.submit, requests, concurrency)
            return result, batcher.counters()

    result, counters = run_sync(main())
    return result.summary("dynamic", batch_size=None, max_batch_size=max_batch_size,
                          max_wait_ms=max_wait_ms, mean_batch_size=counters["mean_batch_size"],
                          workload=workload)


def continuous_run(engine: Engine, requests: Sequence[Request], concurrency: int,
                   workload: str = "") -> dict:
    """``concurrency`` closed-loop clients, each handing single requests to a continuous-batching
    engine from its own thread (the engine merges them per step): one ``"continuous"`` run."""
    from labkit.bench.loadgen import closed_loop, run_sync

    if not engine.continuous:
        raise ValueError(f"engine {engine.name!r} does not batch continuously; use hf-cb or vllm")
    pool = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="client")

    async def send(request: Request):
        [completion] = await asyncio.get_running_loop().run_in_executor(
            pool, engine.generate, [request])
        return completion

    try:
        result = run_sync(closed_loop(send, requests, concurrency))
    finally:
        pool.shutdown(wait=True)
    return result.summary("continuous", batch_size=None, workload=workload)


def default_sizes(profile: str) -> dict:
    """Lab sizes per profile: batch sizes, concurrencies, requests, output tokens."""
    from labkit.config import by_profile

    return by_profile(
        profile,
        ci=dict(batch_sizes=[1, 4, 16], concurrencies=[4, 16], num_requests=16,
                output_tokens=32, max_output_tokens=48, max_prompt_tokens=48, max_batches=None),
        full=dict(batch_sizes=[1, 4, 16, 64, 256], concurrencies=[32, 128, 256],
                  num_requests=256, output_tokens=128, max_output_tokens=512,
                  max_prompt_tokens=None, max_batches=8))


def run_batching_bench(engine: str | Engine = "hf", model: str = DEFAULT_MODEL,
                       batch_sizes: Sequence[int] | None = None,
                       concurrencies: Sequence[int] | None = None,
                       num_requests: int | None = None, output_tokens: int | None = None,
                       max_output_tokens: int | None = None,
                       continuous_engine: str | Engine | None = None,
                       max_wait_ms: float = MAX_WAIT_MS, profile: str | None = None,
                       max_prompt_tokens: int | str | None = "profile",
                       json_path: str | Path | None = None, progress: bool = True) -> dict:
    """The ``batching`` bench (see module doc); returns the bench document.

    Two workloads of ``num_requests`` greedy plain-text requests (``ignore_eos``, the bundled
    prompts, of mixed length):
    ``fixed`` (every output ``output_tokens`` long) for the static sweep over ``batch_sizes``
    and the dynamic batcher at the largest batch size (the apples-to-apples comparison), and
    ``wide`` (lognormal outputs from 4 to ``max_output_tokens``) for static (largest batch),
    dynamic and continuous at each of ``concurrencies``. Each run's ``workload`` field names
    its workload. Prompts longer than ``max_prompt_tokens`` are left out (``"profile"``: 48 in
    ci, none in full; see ``capped_workload``). ``continuous_engine`` defaults to ``vllm`` on a
    GPU where installed, else ``hf-cb``; pass ``"none"`` to skip it. Defaults come from
    ``default_sizes(profile)``.
    """
    from labkit.config import resolve_profile
    from labkit.engines import as_engine as _engine
    from labkit.engines import engine_device as _device_of
    from labkit.metrics import write_json

    sizes = default_sizes(resolve_profile(profile))
    batch_sizes = list(batch_sizes or sizes["batch_sizes"])
    concurrencies = list(concurrencies or sizes["concurrencies"])
    n = num_requests or sizes["num_requests"]
    big = max(batch_sizes)
    eng, owned = _engine(engine, model)
    try:
        cap = sizes["max_prompt_tokens"] if max_prompt_tokens == "profile" else max_prompt_tokens
        fixed = capped_workload(eng, n, cap, min_output_tokens=1,
                                max_output_tokens=output_tokens or sizes["output_tokens"])
        wide = capped_workload(eng, n, cap, **WIDE_OUTPUT,
                               max_output_tokens=max_output_tokens or sizes["max_output_tokens"])
        eng.warmup()
        runs = static_sweep(eng, fixed, batch_sizes, workload="fixed", progress=progress,
                            max_batches=sizes["max_batches"])
        runs.append(dynamic_run(eng, fixed, big, max_batch_size=big, max_wait_ms=max_wait_ms,
                                workload="fixed"))
        runs.append(static_run(eng, wide, big, workload="wide"))
        runs += [dynamic_run(eng, wide, c, max_batch_size=big, max_wait_ms=max_wait_ms,
                             workload="wide") for c in concurrencies]
        device = _device_of(eng)
    finally:
        if owned:
            eng.close()
    cont_name = _continuous_name(continuous_engine)
    if cont_name != "none":
        cont, cont_owned = _engine(continuous_engine if isinstance(continuous_engine, Engine)
                                   else cont_name, model)
        try:
            cont.warmup()
            runs += [dict(continuous_run(cont, wide, c, workload="wide"), engine=cont.name)
                     for c in concurrencies]
        finally:
            if cont_owned:
                cont.close()
    doc = bench_document("batching", runs, engine=eng.name, model=eng.model_name, device=device,
                         continuous_engine=cont_name, max_wait_ms=max_wait_ms)
    if json_path is not None:
        write_json(doc, json_path)
    return doc


def _continuous_name(continuous_engine: str | Engine | None) -> str:
    if isinstance(continuous_engine, Engine):
        return continuous_engine.name
    if continuous_engine is None:
        from labkit.device import has_cuda
        from labkit.engines import vllm_available

        return "vllm" if has_cuda() and vllm_available() else "hf-cb"
    from labkit.config import choose

    return choose(continuous_engine, CONTINUOUS_ENGINES, "continuous engine")


def runs_frame(document: dict):
    """The runs of a batching document as a DataFrame: one row per run, with the p50/p90/p99 of
    TTFT and E2E (s) flattened into columns (``ttft_p50_s``, ``e2e_p99_s``, ...)."""
    import pandas as pd

    rows = []
    for run in document["runs"]:
        row = {k: v for k, v in run.items() if not isinstance(v, dict)}
        for metric in ("ttft_s", "tpot_s", "e2e_s"):
            for q in ("p50", "p90", "p99"):
                row[f"{metric[:-2]}_{q}_s"] = run[metric][q]
        rows.append(row)
    return pd.DataFrame(rows)
