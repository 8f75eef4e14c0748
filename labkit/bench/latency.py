"""``labkit bench latency``: one request at a time, its decode speed against the roofline.

- ``run_latency_bench``: requests sent one after another (no queueing, no batching) after a
  warm-up per shape, one ``"latency"`` run per (prompt length, output length) pair, each with
  the roofline fields of ``roofline_fields``.
- ``roofline_fields``: batch-1 decode tokens/s (1 / mean TPOT) beside the memory-bandwidth bound
  of ``labkit.roofline.decode_roofline`` for the engine's weights (``labkit.sizes``).
- ``decode_sweep``: decode tokens/s of one static batch per batch size.
- ``distinct_prompts``: prompts of one length that share no prefix. Every request of both
  benches gets its own, warm-ups included, so an engine that caches prefixes (vLLM's automatic
  prefix caching) cannot serve one request's prefill from another's: TTFT times a whole prefill.

Used by the profiling lab (lab 01).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

from labkit.bench.workloads import prompt_of_length
from labkit.config import DEFAULT_MODEL
from labkit.engines import as_engine, engine_device
from labkit.engines.base import Engine, Request
from labkit.metrics import bench_document, summarize, write_json
from labkit.widgets import Progress


def run_latency_bench(engine: str | Engine = "hf", model: str = DEFAULT_MODEL,
                      num_requests: int = 10, prompt_lens: Sequence[int] = (32, 128),
                      out_lens: Sequence[int] = (32,), warmup: int = 1,
                      json_path: str | Path | None = None, progress: bool = True,
                      **engine_kwargs) -> dict:
    """The ``latency`` bench: requests one at a time (no queueing, no batching) after warm-up.

    Warm-up: ``engine.warmup()`` ``warmup`` times, then ``warmup`` untimed requests of each
    (prompt length, output length) shape before that shape is timed: an engine with a static
    KV cache and CUDA graphs builds them per shape, and the first request of a new shape would
    otherwise carry that cost in its TTFT and TPOT. Every request, warm-ups included, has its own
    prompt (``distinct_prompts``), so prefix caching never shortens a prefill. ``num_requests``
    per shape: 10 or more give percentiles that do not jump from run to run. The timed requests
    go round robin over the shapes, so a change in the machine's load (a shared CPU) hits every
    shape alike instead of skewing one; a run's ``duration_s`` is the sum of its requests'
    end-to-end times.

    One run named ``"latency"`` per (prompt length, output length) pair, with extra fields
    ``prompt_len`` (target prompt tokens), ``out_len`` (output tokens, ``ignore_eos``),
    ``prompt_tokens`` (mean actual) and the fastest request's ``ttft_min_s``, ``tpot_min_s``,
    ``e2e_min_s`` (``fastest``). ``engine`` is a name for ``get_engine`` or an Engine.
    Returns the bench document and writes it to ``json_path`` when given.
    """
    if num_requests < 1 or warmup < 0:
        raise ValueError(f"need num_requests >= 1 and warmup >= 0, got {num_requests!r}, "
                         f"{warmup!r}")
    eng, owned = as_engine(engine, model, **engine_kwargs)
    try:
        for _ in range(warmup):
            eng.warmup()
        pairs = [(p, o) for p in prompt_lens for o in out_lens]
        texts = {pair: distinct_prompts(eng.tokenizer, pair[0], warmup + num_requests)
                 for pair in pairs}
        for (_, out_len), prompts in texts.items():
            for text in prompts[:warmup]:
                eng.generate([Request(prompt=text, max_tokens=out_len, ignore_eos=True)])
        done: dict[tuple[int, int], list] = {pair: [] for pair in pairs}
        bar = Progress(len(pairs) * num_requests, "latency", progress)
        for i in range(warmup, warmup + num_requests):  # round robin over the shapes
            for pair in pairs:
                request = Request(prompt=texts[pair][i], max_tokens=pair[1], ignore_eos=True)
                done[pair] += eng.generate([request])
                bar.update()
        bar.close()
        runs = []
        for (prompt_len, out_len), completions in done.items():
            prompt_tokens = sum(c.prompt_tokens for c in completions) / len(completions)
            run = summarize(completions, sum(c.e2e_s for c in completions), name="latency",
                            batch_size=1, concurrency=1, prompt_len=prompt_len, out_len=out_len,
                            prompt_tokens=prompt_tokens, **fastest(completions))
            run.update(roofline_fields(eng, run["tpot_s"]["mean"], prompt_tokens + out_len / 2))
            runs.append(run)
        bar.close()
        doc = bench_document("latency", runs, engine=eng.name, model=eng.model_name,
                             device=engine_device(eng), warmup=warmup, distinct_prompts=True)
    finally:
        if owned:
            eng.close()
    if json_path is not None:
        write_json(doc, json_path)
    return doc


def fastest(completions) -> dict[str, float | None]:
    """The fastest TTFT, TPOT and E2E (s) among ``completions``: ``ttft_min_s``, ``tpot_min_s``,
    ``e2e_min_s``. Noise on a shared machine only ever adds time, so the fastest of several
    requests estimates what one costs more steadily than a percentile does (a percentile says
    what users see); None where no request has the metric (TPOT of one-token outputs)."""
    out = {}
    for metric in ("ttft_s", "tpot_s", "e2e_s"):
        values = [getattr(c, metric) for c in completions if getattr(c, metric) is not None]
        out[metric.replace("_s", "_min_s")] = min(values) if values else None
    return out


_PROMPT_NUMBERS = itertools.count()  # one number per prompt made in this process


def distinct_prompts(tokenizer, n_tokens: int, count: int) -> list[str]:
    """``count`` prompts of about ``n_tokens`` tokens, no two alike in this process: each opens
    with its own number (``"Request 17. "``), then the bundled text (``prompt_of_length``). Two
    of them share at most their first three tokens, less than one block of a prefix cache
    (16 tokens in vLLM): nothing to reuse. ``n_tokens >= 12`` keeps each number whole."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count!r}")
    body = tokenizer(prompt_of_length(tokenizer, n_tokens), add_special_tokens=False)["input_ids"]
    prompts = []
    for _ in range(count):
        tag = tokenizer(f"Request {next(_PROMPT_NUMBERS)}. ",
                        add_special_tokens=False)["input_ids"]
        prompts.append(tokenizer.decode((tag + body)[:n_tokens]))
    return prompts


def _held_weights(engine: Engine) -> tuple[int, int]:
    """(bytes of the weights the engine holds, bytes per element of its model's dtype).

    A transformers engine is measured on its model (``labkit.sizes.weight_bytes``); vLLM keeps
    the model in its own worker, so its checkpoint is counted in bf16 (``checkpoint_bytes``).
    """
    from labkit.sizes import checkpoint_bytes, weight_bytes

    model = getattr(engine, "model", None)
    if model is not None and hasattr(model, "parameters"):
        return weight_bytes(model), next(model.parameters()).element_size()
    return checkpoint_bytes(engine.ref.path, element_bytes=2), 2


def roofline_fields(engine: Engine, tpot_s: float, context_tokens: float,
                    weight_bytes: int | None = None) -> dict:
    """Batch-1 decode tokens/s (1 / mean TPOT), its memory-bandwidth bound and the fraction.

    Bound = bandwidth / (weight bytes + KV-cache bytes read per step), see
    ``labkit.roofline.decode_roofline``; bandwidth is the GPU's datasheet HBM figure, or a
    measured copy bandwidth on a CPU (``bandwidth_source`` says which). Pass ``weight_bytes``
    for quantized weights, whose packed size the engine's parameters do not show.
    """
    from transformers import AutoConfig

    from labkit.profiling import kv_cache_bytes_per_token
    from labkit.roofline import decode_roofline, memory_bandwidth

    weights, elem = _held_weights(engine)
    elem = 2 if weight_bytes is not None else elem  # quantized models keep a bf16 KV cache
    weights = weight_bytes if weight_bytes is not None else weights
    config = AutoConfig.from_pretrained(engine.ref.path)
    kv = kv_cache_bytes_per_token(config, elem)
    bandwidth, source = memory_bandwidth(getattr(engine, "device", None)
                                         if engine.name != "vllm" else "cuda")
    bound = decode_roofline(weights, kv, context_tokens, 1, bandwidth)
    measured = 1 / tpot_s if tpot_s and tpot_s > 0 else math.nan
    return {"decode_tokens_per_s": measured, "weight_bytes": weights,
            "kv_bytes_per_token": kv, "bandwidth_bytes_per_s": bandwidth,
            "bandwidth_source": source, "roofline_tokens_per_s": bound,
            "fraction_of_roofline": measured / bound}


def decode_sweep(engine: Engine, batch_sizes: Sequence[int], prompt_len: int = 32,
                 out_len: int = 32, progress: bool = True, warmup: bool = True):
    """Decode tokens/s of one static batch per size: ``batch_size / mean TPOT`` (tok/s).

    With ``warmup`` each batch is generated once untimed before the timed run (a new batch size
    means new kernels, allocations and, on the static-cache path, a new CUDA graph). Every
    sequence, warm-up ones included, has its own prompt (``distinct_prompts``): a batch of one
    repeated prompt would let prefix caching share its KV blocks. TPOT excludes the first
    token, so prefill stays out; ``context_tokens`` is the mean context a decode step attends to
    (prompt + half the output), for ``labkit.roofline.decode_roofline``.
    """
    import pandas as pd

    if out_len < 2:
        raise ValueError(f"out_len must be >= 2 to measure decode (TPOT), got {out_len!r}")
    rows = []
    for b in Progress.wrap(batch_sizes, "decode sweep", progress):
        rounds = 2 if warmup else 1
        texts = distinct_prompts(engine.tokenizer, prompt_len, rounds * b)
        reqs = [[Request(prompt=t, max_tokens=out_len, ignore_eos=True) for t in texts[i::rounds]]
                for i in range(rounds)]
        if warmup:
            engine.generate(reqs[1])
        done = engine.generate(reqs[0])
        tpot = sum(c.tpot_s for c in done) / len(done)
        rows.append({"batch_size": b, "tpot_s": tpot, "decode_tokens_per_s": b / tpot,
                     "prompt_tokens": done[0].prompt_tokens,
                     "context_tokens": done[0].prompt_tokens + out_len / 2})
    return pd.DataFrame(rows)
