"""Benchmarks: workloads from data/prompts.jsonl, closed- and open-loop load, records, JSON.

Load generators are asyncio coroutines over any ``send(request) -> Completion`` coroutine: an
engine in a thread (``engine_sender``), the serving lab's service, or an HTTP client. Each
request's ``start_s`` is set to the moment the generator sent it, so queueing counts in TTFT and
E2E, as a client sees them. Metrics come from ``labkit.metrics`` (vLLM's definitions).

- closed loop: ``concurrency`` clients, each sends its next request when the previous completes.
  Load adapts to the server: it can never be overloaded, so it hides queueing collapse.
- open loop: requests arrive as a Poisson process at ``rate`` req/s (seeded), whether or not the
  server keeps up. Use it to find the rate where latency blows up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from labkit.config import SEED, choose
from labkit.engines.base import Completion, Engine, Request, now
from labkit.metrics import bench_document, summarize

PROMPTS_PATH = Path(__file__).resolve().parent.parent / "data" / "prompts.jsonl"
OUTPUT_LEN_DISTS = ("fixed", "uniform", "lognormal")

Sender = Callable[[Request], Awaitable[Completion]]


# --- workloads ---------------------------------------------------------------------------------

def load_prompts(path: str | Path = PROMPTS_PATH) -> list[dict]:
    """The prompt records (``prompt``, ``category``) of a JSONL file."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"no prompts in {path}")
    return rows


def output_lengths(n: int, min_tokens: int, max_tokens: int, dist: str = "fixed",
                   seed: int = SEED) -> list[int]:
    """``n`` output lengths in [min_tokens, max_tokens] (tokens).

    ``fixed``: all ``max_tokens``. ``uniform``: integers uniform in the range. ``lognormal``:
    heavy-tailed around the range's geometric mean, clipped: many short, a few long, as in chat
    traffic (what continuous batching is for).
    """
    import numpy as np

    choose(dist, OUTPUT_LEN_DISTS, "output_len_dist")
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens!r}, {max_tokens!r}")
    rng = np.random.default_rng(seed)
    if dist == "fixed":
        return [max_tokens] * n
    if dist == "uniform":
        return [int(v) for v in rng.integers(min_tokens, max_tokens + 1, size=n)]
    median = math.sqrt(min_tokens * max_tokens)
    sigma = max(math.log(max_tokens / min_tokens) / 3, 1e-6)  # the range spans about +-1.5 sigma
    draws = rng.lognormal(math.log(median), sigma, size=n)
    return [int(v) for v in np.clip(np.rint(draws), min_tokens, max_tokens)]


def distinct_prompt(text: str, i: int, pool_size: int) -> str:
    """Prompt ``text`` as request ``i`` of a workload that cycles a pool of ``pool_size`` prompts:
    the first pass as is, later passes with a ``(request i)`` prefix. No two requests are then
    identical, so neither a response cache nor a prefix cache turns a load test into a cache test
    (workloads with controlled repeats: ``labkit.cache_bench.zipf_workload``)."""
    return text if i < pool_size else f"(request {i}) {text}"


def make_workload(n: int, seed: int = SEED, min_output_tokens: int = 16,
                  max_output_tokens: int = 64, output_len_dist: str = "fixed",
                  chat: bool = True, path: str | Path = PROMPTS_PATH) -> list[Request]:
    """``n`` distinct greedy requests over the bundled prompts, shuffled with ``seed``.

    ``ignore_eos=True``, so each request produces exactly its ``max_tokens`` (drawn by
    ``output_lengths``). ``chat=True`` sends the prompt as a user message (chat template). Past
    the bundled prompts' count the prompts come round again, numbered (``distinct_prompt``).
    """
    import numpy as np

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    prompts = load_prompts(path)
    rng = np.random.default_rng(seed)
    order = [int(i) for i in rng.permutation(len(prompts))]
    lens = output_lengths(n, min_output_tokens, max_output_tokens, output_len_dist, seed + 1)
    reqs = []
    for i, max_tokens in enumerate(lens):
        text = distinct_prompt(prompts[order[i % len(order)]]["prompt"], i, len(order))
        kind = {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
        reqs.append(Request(**kind, max_tokens=max_tokens, ignore_eos=True,
                            request_id=f"wl-{seed}-{i}"))
    return reqs


def prompt_of_length(tokenizer, n_tokens: int, path: str | Path = PROMPTS_PATH) -> str:
    """Plain text that encodes to about ``n_tokens`` tokens (the bundled prompts, repeated, cut).

    Decoding a token prefix and encoding it again can differ by a token or two at the cut: the
    Completion's ``prompt_tokens`` is the exact count.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens!r}")
    corpus = " ".join(r["prompt"] for r in load_prompts(path))
    ids = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    while len(ids) < n_tokens:
        ids = ids + ids
    return tokenizer.decode(ids[:n_tokens])


# --- load generators ---------------------------------------------------------------------------

@dataclass
class LoadResult:
    """Completions of one load run, its wall time (s) and the most requests in flight at once."""

    completions: list[Completion]
    duration_s: float
    max_in_flight: int
    concurrency: int | None = None
    request_rate: float | None = None
    send_times_s: list[float] = dataclasses.field(default_factory=list)

    def summary(self, name: str, slo: dict[str, float] | None = None, **extra) -> dict:
        """One ``runs[]`` entry of the bench JSON contract (``labkit.metrics.summarize``)."""
        return summarize(self.completions, self.duration_s, name=name,
                         concurrency=self.concurrency, request_rate=self.request_rate, slo=slo,
                         **extra)


class _InFlight:
    def __init__(self) -> None:
        self.now = self.max = 0

    async def run(self, send: Sender, request: Request, sent: list[float]) -> Completion:
        t = now()
        sent.append(t)
        self.now += 1
        self.max = max(self.max, self.now)
        try:
            completion = await send(request)
        finally:
            self.now -= 1
        # Client view: the request started when it was sent (queueing included).
        return dataclasses.replace(completion, start_s=min(completion.start_s, t))


async def closed_loop(send: Sender, requests: Sequence[Request], concurrency: int) -> LoadResult:
    """``concurrency`` clients share ``requests``; each sends its next one when the last returns.

    Completions come back in request order.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency!r}")
    queue = list(enumerate(requests))[::-1]
    out: list[Completion | None] = [None] * len(requests)
    tracker, sent = _InFlight(), []

    async def client() -> None:
        while queue:
            i, req = queue.pop()
            out[i] = await tracker.run(send, req, sent)

    start = now()
    await asyncio.gather(*(client() for _ in range(min(concurrency, len(requests)))))
    return LoadResult(list(out), now() - start, tracker.max, concurrency=concurrency,
                      send_times_s=sorted(sent))


def poisson_arrivals(n: int, rate: float, seed: int = SEED) -> list[float]:
    """Arrival offsets (s) of ``n`` requests at ``rate`` req/s: exponential gaps, first at 0.

    ``rate=inf`` sends everything at once.
    """
    import numpy as np

    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s (or inf), got {rate!r}")
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    gaps[0] = 0.0
    return [float(v) for v in np.cumsum(gaps)]


async def open_loop(send: Sender, requests: Sequence[Request], rate: float,
                    seed: int = SEED) -> LoadResult:
    """Send ``requests`` at Poisson arrival times of ``rate`` req/s, never waiting for replies.

    Completions come back in request order.
    """
    arrivals = poisson_arrivals(len(requests), rate, seed)
    tracker, sent = _InFlight(), []
    tasks = []
    start = now()
    for offset, req in zip(arrivals, requests):
        delay = start + offset - now()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(tracker.run(send, req, sent)))
    out = await asyncio.gather(*tasks)
    return LoadResult(list(out), now() - start, tracker.max, request_rate=rate,
                      send_times_s=sorted(sent))


def engine_sender(engine: Engine) -> Sender:
    """``send`` for an engine on one worker thread: one request at a time, in arrival order.

    The event loop stays free while the engine works; requests that arrive meanwhile wait in the
    executor's queue, and that wait shows in their TTFT (no batching: that is the next lab).
    """
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    async def send(request: Request) -> Completion:
        loop = asyncio.get_running_loop()
        [completion] = await loop.run_in_executor(pool, engine.generate, [request])
        return completion

    return send


def run_sync(coro):
    """Run a coroutine to completion from sync code, also inside Jupyter's running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


# --- records -----------------------------------------------------------------------------------

def records_frame(completions: Sequence[Completion]):
    """One row per request: ids, token counts, ttft_s, tpot_s, mean_itl_s, e2e_s (seconds)."""
    import pandas as pd

    rows = []
    for c in completions:
        itl = c.itl_s
        rows.append({"request_id": c.request_id, "prompt_tokens": c.prompt_tokens,
                     "output_tokens": c.output_tokens, "finish_reason": c.finish_reason,
                     "ttft_s": c.ttft_s, "tpot_s": c.tpot_s,
                     "mean_itl_s": sum(itl) / len(itl) if itl else None, "e2e_s": c.e2e_s,
                     "start_s": c.start_s, "end_s": c.end_s})
    return pd.DataFrame(rows)


def strict_json(value):
    """``value`` with every NaN or infinite float replaced by None, recursively.

    A statistic with no defined value (the TPOT of a one-chunk cache hit) becomes JSON ``null``:
    Python would write ``NaN``, which is not JSON and which jq, browsers and most parsers reject.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def json_text(document, **dumps_kwargs) -> str:
    """``document`` as indented, strict JSON (``strict_json``: undefined values as null)."""
    return json.dumps(strict_json(document), indent=2, allow_nan=False, **dumps_kwargs)


def write_json(document: dict, path: str | Path) -> Path:
    """Write a bench document as ``json_text`` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json_text(document) + "\n")
    return path


# --- the latency bench and the decode sweep ----------------------------------------------------

def int_list(text: str) -> list[int]:
    """argparse ``type=`` for ``"32,128,512"`` -> ``[32, 128, 512]`` (positive integers)."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers like 32,128; got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"expected positive integers like 32,128; got {text!r}")
    return values


def _engine(engine: str | Engine, model: str, **engine_kwargs) -> tuple[Engine, bool]:
    if isinstance(engine, Engine):
        return engine, False
    from labkit.engines import get_engine

    return get_engine(engine, model=model, **engine_kwargs), True


def run_latency_bench(engine: str | Engine = "hf", model: str = "smollm2-135m",
                      num_requests: int = 4, prompt_lens: Sequence[int] = (32, 128),
                      out_lens: Sequence[int] = (32,), warmup: int = 1,
                      json_path: str | Path | None = None, progress: bool = True,
                      **engine_kwargs) -> dict:
    """The ``latency`` bench: requests one at a time (no queueing, no batching) after warm-up.

    Warm-up: ``engine.warmup()`` ``warmup`` times, then ``warmup`` untimed requests of each
    (prompt length, output length) shape before that shape is timed: an engine with a static
    KV cache and CUDA graphs builds them per shape, and the first request of a new shape would
    otherwise carry that cost in its TTFT and TPOT.

    One run named ``"latency"`` per (prompt length, output length) pair, with extra fields
    ``prompt_len`` (target prompt tokens), ``out_len`` (output tokens, ``ignore_eos``) and
    ``prompt_tokens`` (mean actual). ``engine`` is a name for ``get_engine`` or an Engine.
    Returns the bench document and writes it to ``json_path`` when given.
    """
    from tqdm.auto import tqdm

    if num_requests < 1 or warmup < 0:
        raise ValueError(f"need num_requests >= 1 and warmup >= 0, got {num_requests!r}, "
                         f"{warmup!r}")
    eng, owned = _engine(engine, model, **engine_kwargs)
    try:
        for _ in range(warmup):
            eng.warmup()
        pairs = [(p, o) for p in prompt_lens for o in out_lens]
        runs = []
        bar = tqdm(total=len(pairs) * num_requests, desc="latency", disable=not progress)
        for prompt_len, out_len in pairs:
            text = prompt_of_length(eng.tokenizer, prompt_len)
            for _ in range(warmup):
                eng.generate([Request(prompt=text, max_tokens=out_len, ignore_eos=True)])
            done = []
            start = now()
            for _ in range(num_requests):
                [c] = eng.generate([Request(prompt=text, max_tokens=out_len, ignore_eos=True)])
                done.append(c)
                bar.update()
            prompt_tokens = sum(c.prompt_tokens for c in done) / len(done)
            run = summarize(done, now() - start, name="latency", batch_size=1, concurrency=1,
                            prompt_len=prompt_len, out_len=out_len, prompt_tokens=prompt_tokens)
            run.update(roofline_fields(eng, run["tpot_s"]["mean"], prompt_tokens + out_len / 2))
            runs.append(run)
        bar.close()
        doc = bench_document("latency", runs, engine=eng.name, model=eng.model_name,
                             device=_device_of(eng), warmup=warmup)
    finally:
        if owned:
            eng.close()
    if json_path is not None:
        write_json(doc, json_path)
    return doc


def engine_weight_bytes(engine: Engine) -> tuple[int, int]:
    """(bytes of the weights as the engine holds them, bytes per element of its dtype).

    A transformers engine is measured on its model; for others (vLLM keeps the model in its
    own worker) we count parameters in the checkpoint's safetensors headers and assume bf16.
    """
    from labkit.profiling import weight_bytes

    model = getattr(engine, "model", None)
    if model is not None and hasattr(model, "parameters"):
        return weight_bytes(model), next(model.parameters()).element_size()
    from safetensors import safe_open

    params = 0
    for path in Path(engine.ref.path).glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                params += math.prod(shape)
    return 2 * params, 2


def roofline_fields(engine: Engine, tpot_s: float, context_tokens: float,
                    weight_bytes: int | None = None) -> dict:
    """Batch-1 decode tokens/s (1 / mean TPOT), its memory-bandwidth bound and the fraction.

    Bound = bandwidth / (weight bytes + KV-cache bytes read per step), see
    ``labkit.profiling.decode_roofline``; bandwidth is the GPU's datasheet HBM figure, or a
    measured copy bandwidth on a CPU (``bandwidth_source`` says which). Pass ``weight_bytes``
    for quantized weights, whose packed size the engine's parameters do not show.
    """
    from transformers import AutoConfig

    from labkit.profiling import decode_roofline, kv_cache_bytes_per_token, memory_bandwidth

    weights, elem = engine_weight_bytes(engine)
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


def _device_of(engine: Engine) -> str | None:
    from labkit.device import device_name

    dev = getattr(engine, "device", None)
    try:
        return device_name(dev) if dev is not None else None
    except (RuntimeError, TypeError, ValueError):
        return None


def decode_sweep(engine: Engine, batch_sizes: Sequence[int], prompt_len: int = 32,
                 out_len: int = 32, progress: bool = True, warmup: bool = True):
    """Decode tokens/s of one static batch per size: ``batch_size / mean TPOT`` (tok/s).

    With ``warmup`` each batch is generated once untimed before the timed run (a new batch size
    means new kernels, allocations and, on the static-cache path, a new CUDA graph). TPOT
    excludes the first token, so prefill stays out; ``context_tokens`` is the mean context a
    decode step attends to (prompt + half the output), for ``decode_roofline``.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    if out_len < 2:
        raise ValueError(f"out_len must be >= 2 to measure decode (TPOT), got {out_len!r}")
    text = prompt_of_length(engine.tokenizer, prompt_len)
    rows = []
    for b in tqdm(list(batch_sizes), desc="decode sweep", disable=not progress):
        reqs = [Request(prompt=text, max_tokens=out_len, ignore_eos=True) for _ in range(b)]
        if warmup:
            engine.generate(reqs)
        done = engine.generate(reqs)
        tpot = sum(c.tpot_s for c in done) / len(done)
        rows.append({"batch_size": b, "tpot_s": tpot, "decode_tokens_per_s": b / tpot,
                     "prompt_tokens": done[0].prompt_tokens,
                     "context_tokens": done[0].prompt_tokens + out_len / 2})
    return pd.DataFrame(rows)
