"""``labkit bench cache`` and the caching lab's (lab 03) workloads: a Zipf request stream, the
hit ratio an exact cache would reach on it, the latency of the hit and miss paths through a real
engine, and TTFT with a long shared prefix against unique prefixes (what prefix caching saves:
vLLM's, through ``prefix_sharing_ttft``, or a one-entry prefix cache by hand on a transformers
model, ``kv_reuse_ttft``).

Workloads. ``zipf_workload`` draws prompts with Zipf popularity and a set share of repeats
(``repeat_fraction``); ``simulate_hit_ratio`` replays such a stream through an LRU of a given
capacity without an engine. ``run_cache_bench`` times the two paths for real and writes the bench
JSON (runs ``"miss"``, ``"hit"``, ``"workload"``), one ``PathTiming`` per request. Before any
work it checks that the cache's Redis answers (a wrong ``REDIS_URL`` port or password is a
one-line error, not a traceback after the run); if Redis fails during the run, lookups fail open
(misses) and the JSON is still written, with ``degraded`` saying why.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from labkit.config import SEED
from labkit.engines.base import Request
from labkit.serving.cache import ResponseCache
from labkit.serving.cache_backends import LRUBackend, backend_errors
from labkit.serving.keys import namespace
from labkit.widgets import Progress

# -- workloads -------------------------------------------------------------------------------
_TEMPLATES = ("What is the capital of {}?", "Name a traditional dish from {}.",
              "Which languages are spoken in {}?", "Give one fun fact about {}.",
              "What is the population of {} roughly?", "Describe the climate of {} in one line.")
_PLACES = ("France", "Spain", "Italy", "Germany", "Japan", "Brazil", "Canada", "Kenya", "India",
           "Peru", "Norway", "Egypt", "Mexico", "Chile", "Vietnam", "Ghana", "Poland", "Greece",
           "Turkey", "Nepal", "Iceland", "Morocco", "Portugal", "Argentina", "Australia")


def prompt_pool(n: int) -> list[str]:
    """``n`` distinct short prompts (templates x places, then numbered variants)."""
    base = [t.format(p) for t in _TEMPLATES for p in _PLACES]
    return [base[i % len(base)] + ("" if i < len(base) else f" (variant {i // len(base)})")
            for i in range(n)]


def zipf_workload(num_requests: int, repeat_fraction: float, *, zipf_s: float = 1.1,
                  seed: int = SEED, prompts: Sequence[str] | None = None) -> list[str]:
    """A stream of prompts where exactly ``round(repeat_fraction * num_requests)`` requests repeat
    an earlier one, and which earlier one follows Zipf popularity (rank r has weight 1/r**zipf_s;
    rank = order of first appearance). The rest are first occurrences of new prompts.

    An unbounded cache with no TTL therefore hits exactly the repeats: its hit ratio equals
    ``repeat_fraction`` to within 1/(2 * num_requests). Deterministic for a given ``seed``.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests!r}")
    if not 0.0 <= repeat_fraction < 1.0:
        raise ValueError(f"repeat_fraction must be in [0, 1), got {repeat_fraction!r}")
    rng = np.random.default_rng(seed)
    n_repeat = min(round(repeat_fraction * num_requests), num_requests - 1)
    is_repeat = np.zeros(num_requests, dtype=bool)
    is_repeat[1 + rng.choice(num_requests - 1, size=n_repeat, replace=False)] = True
    n_unique = num_requests - n_repeat
    pool = list(prompts) if prompts is not None else prompt_pool(n_unique)
    if len(pool) < n_unique:
        raise ValueError(f"need {n_unique} distinct prompts, got {len(pool)}")
    weights = 1.0 / np.arange(1, n_unique + 1) ** zipf_s
    stream: list[str] = []
    seen = 0
    for rep in is_repeat:
        if rep:
            w = weights[:seen]
            stream.append(pool[rng.choice(seen, p=w / w.sum())])
        else:
            stream.append(pool[seen])
            seen += 1
    return stream


def simulate_hit_ratio(stream: Sequence[str], *, capacity: int | None = None,
                       ttl_s: float | None = None, request_rate: float = 1.0) -> float:
    """Hit ratio of an LRU cache (``capacity`` entries, ``ttl_s`` seconds) replaying ``stream``
    with one request every ``1 / request_rate`` seconds of simulated time. No engine involved."""
    clock = [0.0]
    cache = ResponseCache("sim", LRUBackend(capacity, clock=lambda: clock[0]), ttl_s=ttl_s)
    for i, prompt in enumerate(stream):
        clock[0] = i / request_rate
        key = cache.key(Request(prompt=prompt, max_tokens=1))
        if cache.get(key) is None:
            cache.put(key, {"text": "", "token_ids": []})
    return cache.counters.hit_ratio


def prefix_conversations(num_requests: int, *, prefix_sentences: int = 40,
                         shared: bool = True) -> list[list[dict]]:
    """``num_requests`` chat requests (a long system prompt, then a short user question), for
    the prefix-caching demo. ``shared``: one system prompt for all (the prefix, about 13 tokens a
    sentence: 160 sentences are ~2,100 tokens); else each system prompt starts with its own
    session tag, so requests of the same length share no prefix beyond the chat template's
    first tokens and a prefix cache has nothing to reuse."""
    rules = " ".join(f"Rule {i}: answer briefly, politely and in English." for i in
                     range(prefix_sentences))
    return [[{"role": "system", "content": rules if shared else f"Session {i:04d}. {rules}"},
             {"role": "user", "content": f"Question {i}: {question}"}]
            for i, question in enumerate(prompt_pool(num_requests))]


def prefix_sharing_ttft(engine, *, num_requests: int = 8, prefix_sentences: int = 40,
                        max_tokens: int = 4, shared: bool = True) -> list[float]:
    """TTFT (s) of the ``prefix_conversations`` requests sent one at a time to ``engine``.

    With an engine that caches the KV of shared prefixes (vLLM ``enable_prefix_caching=True``)
    every shared-prefix request after the first skips most of its prefill, so its TTFT drops;
    with ``shared=False``, or without prefix caching, each request pays the full prefill. The
    first value includes filling the prefix cache.
    """
    return [engine.generate([Request(messages=m, max_tokens=max_tokens)])[0].ttft_s
            for m in prefix_conversations(num_requests, prefix_sentences=prefix_sentences,
                                          shared=shared)]


def kv_reuse_ttft(model, tokenizer, conversations: Sequence[list[dict]]) -> list[float]:
    """TTFT (s) of greedy chat requests run one at a time on a transformers ``model`` behind a
    prefix cache of one entry, by hand: the KV cache of the previous prompt is kept, cut back
    (``DynamicCache.crop``) to the tokens the next prompt shares with it, and only the rest of
    the next prompt is prefilled. vLLM does the same for every request, in blocks of 16 tokens
    and for many prefixes at once; transformers' ``generate`` (the ``hf`` engine) does not.
    TTFT here is the prefill plus picking the first token (on the host).
    """
    import torch

    from labkit.engines.base import encode_request

    ttfts, held, cache = [], [], None
    with torch.inference_mode():
        for messages in conversations:
            ids = encode_request(tokenizer, Request(messages=messages, max_tokens=1))
            start = time.perf_counter()
            keep = 0
            while keep < min(len(held), len(ids) - 1) and held[keep] == ids[keep]:
                keep += 1
            if keep == 0:
                cache = None
            elif keep < len(held):
                cache.crop(keep - len(held))  # drop the tokens after the shared ones
            out = model(torch.tensor([ids[keep:]], device=model.device), past_key_values=cache,
                        use_cache=True)
            out.logits[0, -1].argmax().item()  # the first token, on the host
            ttfts.append(time.perf_counter() - start)
            held, cache = ids, out.past_key_values
    return ttfts


# -- the bench -------------------------------------------------------------------------------
@dataclass
class PathTiming:
    """One request's latency through the cache, shaped like a Completion for ``summarize``.

    A hit streams nothing token by token: the whole answer arrives at once, so
    ``ttft_s == e2e_s == lookup time``. A miss adds the lookup to the engine's own timings.
    """

    e2e_s: float
    ttft_s: float | None
    output_tokens: int
    tpot_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    hit: bool = False


def run_cache_bench(engine, model: str, num_requests: int = 64, repeat_fraction: float = 0.5,
                    *, max_tokens: int = 16, backend: str = "redis", url: str | None = None,
                    seed: int = SEED, progress: bool = True) -> dict:
    """Replay a Zipf workload (``zipf_workload``) through an exact cache in front of ``engine``.

    ``engine``: an Engine or an engine name (then built with ``get_engine(name, model=model)``
    and closed at the end). Requests are greedy chat requests (one user message), one at a
    time. Returns the bench JSON document (``labkit.metrics``) with runs ``"miss"`` and ``"hit"``
    (latency of each path, seconds) and ``"workload"`` (all requests, with ``hit_ratio``,
    ``repeat_fraction``, ``tokens_saved``), plus ``cache_errors`` (backend calls that failed)
    and ``degraded`` (None, or why the cache did not work throughout).
    The cache namespace is private to this run and cleared afterwards. Raises RuntimeError
    before any work when the Redis backend cannot be reached or refuses the password.
    """
    import uuid

    from labkit.metrics import bench_document, summarize

    ns = f"{namespace(model)}-bench-{uuid.uuid4().hex[:8]}"
    cache = ResponseCache(model, backend, url=url, ns=ns)
    _preflight(cache, backend, url)
    own = isinstance(engine, str)
    if own:
        from labkit.engines import get_engine

        engine = get_engine(engine, model=model)
    stream = zipf_workload(num_requests, repeat_fraction, seed=seed)
    not_cleared = None
    timings: list[PathTiming] = []
    try:
        engine.warmup()
        t_run = time.perf_counter()
        for prompt in Progress.wrap(stream, "cache bench", progress):
            request = Request(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens)
            t0 = time.perf_counter()
            key = cache.key(request)
            value = cache.get(key)
            if value is not None:
                dt = time.perf_counter() - t0
                timings.append(PathTiming(dt, dt, len(value["token_ids"]), hit=True))
                continue
            lookup = time.perf_counter() - t0
            done = engine.generate([request])[0]
            cache.put(key, done)
            timings.append(PathTiming(time.perf_counter() - t0,
                                      None if done.ttft_s is None else lookup + done.ttft_s,
                                      done.output_tokens, done.tpot_s, done.itl_s))
        duration = time.perf_counter() - t_run
    finally:
        try:
            cache.clear()
        except backend_errors() as exc:  # Redis went away during the run: keep the results
            not_cleared = f"this run's entries were not cleared ({type(exc).__name__}: {exc})"
        if own:
            engine.close()
    hits = [r for r in timings if r.hit]
    misses = [r for r in timings if not r.hit]
    runs = []
    for name, group in (("miss", misses), ("hit", hits)):
        if group:
            runs.append(summarize(group, sum(r.e2e_s for r in group), name=name, concurrency=1))
    runs.append(summarize(timings, duration, name="workload", concurrency=1,
                          hit_ratio=len(hits) / len(timings), repeat_fraction=repeat_fraction,
                          tokens_saved=sum(r.output_tokens for r in hits),
                          unique_prompts=len(set(stream)), max_tokens=max_tokens))
    errors = cache.counters.errors
    degraded = not_cleared or (cache.state if cache.state != "ok" else None) or (
        f"{errors} cache backend calls failed during the run (answered as misses)"
        if errors else None)
    return bench_document("cache", runs, engine=getattr(engine, "name", type(engine).__name__),
                          model=model, seed=seed, cache_errors=errors,
                          backend=backend if isinstance(backend, str) else type(backend).__name__,
                          degraded=degraded)


def _preflight(cache: ResponseCache, backend: str, url: str | None) -> None:
    """A one-line RuntimeError, before any work, when the cache's Redis cannot be used."""
    if backend != "redis":
        return
    from labkit.serving.redis_server import redact, redis_url

    try:
        cache.ping()
    except backend_errors() as exc:
        raise RuntimeError(
            f"cannot use the Redis cache at {redact(redis_url(url))} ({type(exc).__name__}: "
            f"{exc}); check REDIS_URL's host, port and password, or unset it to use the "
            "embedded server") from None
