"""Workloads: the requests every bench and lab sends, built from data/prompts.jsonl.

- ``make_workload``: ``n`` distinct greedy chat requests, shuffled with a seed, each with an exact
  output length (``ignore_eos``) drawn by ``output_lengths`` (fixed, uniform or lognormal: many
  short, a few long, as in chat traffic).
- ``short_workload``: fixed-length requests over the bundled prompts of at most
  ``max_prompt_chars`` characters, so a CPU's comparisons stay about decode rather than prefill
  (the serving lab, lab 05).
- ``prompt_of_length``: plain text of about ``n`` tokens, for latency sweeps over prompt length.
- ``distinct_prompt``: past the prompt pool's size, requests are numbered, so no two are the
  same and no cache turns a load test into a cache test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from labkit.config import DATA_DIR, SEED, choose
from labkit.engines.base import Request

PROMPTS_PATH = DATA_DIR / "prompts.jsonl"


OUTPUT_LEN_DISTS = ("fixed", "uniform", "lognormal")


def load_prompts(path: str | Path = PROMPTS_PATH) -> list[dict]:
    """The rows (``{"prompt", "category"}``) of a JSONL prompts file."""
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
    (workloads with controlled repeats: ``labkit.bench.caching.zipf_workload``)."""
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


def short_workload(n: int, output_tokens: int, *, max_prompt_chars: int = 120, chat: bool = True,
                   seed: int = 0) -> list[Request]:
    """``n`` distinct fixed-length (``ignore_eos``) greedy requests over the bundled prompts no
    longer than ``max_prompt_chars`` characters, cycled and numbered past the first pass
    (``labkit.bench.workloads.distinct_prompt``). Padding a static batch to one long prompt makes a
    CPU prefill-bound, which hides what batching does for decode; short prompts keep the
    serving lab's comparisons about decode."""
    prompts = [r["prompt"] for r in load_prompts() if len(r["prompt"]) <= max_prompt_chars]
    if not prompts:
        raise ValueError(f"no bundled prompt has <= {max_prompt_chars} characters")
    out = []
    for i in range(n):
        p = distinct_prompt(prompts[(i + seed) % len(prompts)], i, len(prompts))
        kind = {"messages": [{"role": "user", "content": p}]} if chat else {"prompt": p}
        out.append(Request(**kind, max_tokens=output_tokens, ignore_eos=True,
                           request_id=f"sw-{seed}-{i}"))
    return out
