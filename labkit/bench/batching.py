"""The batching bench: what it runs, on which workloads and sizes, and the bench document.

``labkit bench batching`` and the batching lab (lab 02) run the same plan: ``default_sizes``
(per profile) and ``workloads`` (a ``fixed`` workload of equal output lengths for the static
sweep, a ``wide`` one of lognormal output lengths, many short and a few long, for the
comparison), measured by ``labkit.bench.batch_runs`` (``static_sweep``, ``equal_work``: static
batches vs the DynamicBatcher vs continuous batching, interleaved in rounds).

Padding is the price of static batches: ``padding_fraction`` counts it for prompts (pad tokens
in the padded prompt matrix) and for decode (slots of rows that already finished).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from labkit.config import DEFAULT_MODEL
from labkit.engines.base import Engine, Request
from labkit.metrics import bench_document
from labkit.serving.batchers import MAX_WAIT_MS

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
    return [len(engine.encode(r)) for r in requests]


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


def default_sizes(profile: str) -> dict:
    """Sizes of the batching lab and bench per profile.

    Static sweep: ``batch_sizes`` over ``num_requests`` requests of ``output_tokens`` tokens each
    (the ``fixed`` workload), ``max_batches`` batches per size and round, ``rounds`` rounds.
    Equal work: ``concurrency`` clients (and static batches of that size) over ``wide_requests``
    requests (``wide``: lognormal outputs from ``min_output_tokens`` to ``max_output_tokens``,
    many short, a few long), split into ``wide_rounds`` rounds of at least 4 requests per
    client. Prompts longer than ``max_prompt_tokens`` are left out (None: none are).
    """
    from labkit.config import by_profile

    return by_profile(
        profile,
        ci=dict(batch_sizes=[1, 4, 16], num_requests=16, output_tokens=32, max_batches=1,
                rounds=3, concurrency=4, wide_requests=32, min_output_tokens=2,
                max_output_tokens=96, wide_rounds=2, max_prompt_tokens=48),
        full=dict(batch_sizes=[1, 4, 16, 64, 256], num_requests=256, output_tokens=128,
                  max_batches=1, rounds=2, concurrency=64, wide_requests=256,
                  min_output_tokens=8, max_output_tokens=512, wide_rounds=1,
                  max_prompt_tokens=None))


def workloads(engine: Engine, sizes: dict) -> tuple[list[Request], list[Request]]:
    """The two workloads of ``sizes`` (``default_sizes``), over the same bundled prompts:
    ``fixed`` (``num_requests`` outputs of ``output_tokens``) for the static sweep and ``wide``
    (``wide_requests`` lognormal outputs) for the equal-work comparison."""
    cap = sizes["max_prompt_tokens"]
    fixed = capped_workload(engine, sizes["num_requests"], cap, min_output_tokens=1,
                            max_output_tokens=sizes["output_tokens"])
    wide = capped_workload(engine, sizes["wide_requests"], cap, output_len_dist="lognormal",
                           min_output_tokens=sizes["min_output_tokens"],
                           max_output_tokens=sizes["max_output_tokens"])
    return fixed, wide


def make_continuous_engine(name: str, model: str, sizes: dict) -> Engine:
    """The engine of the continuous runs: ``hf-cb`` with its per-step token budget sized for
    ``sizes`` (``concurrency`` requests, each joining with at most ``max_prompt_tokens``, 512 if
    uncapped), or ``vllm``. Left to itself, hf-cb sizes that budget from the free memory and
    asks for about 10 GB on a CPU, which a memory-limited process (``labkit grade``'s sandbox)
    refuses."""
    from labkit.engines import get_engine

    if name == "hf-cb":
        budget = sizes["concurrency"] * (sizes["max_prompt_tokens"] or 512)
        return get_engine(name, model=model, max_batch_tokens=max(256, budget))
    return get_engine(name, model=model)


def run_batching_bench(engine: str | Engine = "hf", model: str = DEFAULT_MODEL,
                       batch_sizes: Sequence[int] | None = None,
                       concurrencies: Sequence[int] | None = None,
                       num_requests: int | None = None,
                       output_tokens: int | None = None, max_output_tokens: int | None = None,
                       continuous_engine: str | Engine | None = None,
                       max_wait_ms: float = MAX_WAIT_MS, profile: str | None = None,
                       max_prompt_tokens: int | str | None = "profile",
                       json_path: str | Path | None = None, progress: bool = True) -> dict:
    """The ``batching`` bench (see module doc); returns the bench document.

    The static sweep over ``batch_sizes`` on the ``fixed`` workload, then ``equal_work`` at each
    of ``concurrencies`` (default: the profile's ``concurrency``) on the ``wide`` one; each run's
    ``workload`` field names its workload.
    ``num_requests``, ``output_tokens`` and ``max_output_tokens`` override the sizes of
    ``default_sizes(profile)`` (the fixed workload's count and length, the wide one's longest
    output), ``max_prompt_tokens`` its prompt cap (``"profile"``: keep it). The continuous runs
    use ``engine`` itself when it batches continuously (``vllm``), else ``continuous_engine``
    (default: ``vllm`` on a GPU where installed, else ``hf-cb``; ``"none"`` skips them).
    """
    from labkit.bench.batch_runs import equal_work, static_sweep
    from labkit.config import resolve_profile
    from labkit.engines import as_engine as _engine
    from labkit.engines import engine_device as _device_of
    from labkit.metrics import write_json

    sizes = dict(default_sizes(resolve_profile(profile)))
    given = dict(batch_sizes=batch_sizes and list(batch_sizes), num_requests=num_requests,
                 output_tokens=output_tokens, max_output_tokens=max_output_tokens)
    sizes.update({k: v for k, v in given.items() if v is not None})
    if max_prompt_tokens != "profile":
        sizes["max_prompt_tokens"] = max_prompt_tokens
    eng, owned = _engine(engine, model)
    cont, cont_owned = None, False
    try:
        fixed, wide = workloads(eng, sizes)
        eng.warmup()
        runs = static_sweep(eng, fixed, sizes["batch_sizes"], workload="fixed",
                            progress=progress, max_batches=sizes["max_batches"],
                            rounds=sizes["rounds"])
        cont_name = eng.name if eng.continuous else _continuous_name(continuous_engine)
        if eng.continuous:
            cont = eng
        elif cont_name != "none":
            cont, cont_owned = (continuous_engine, False) if isinstance(continuous_engine, Engine) \
                else (make_continuous_engine(cont_name, model, sizes), True)
            cont.warmup()
        for c in concurrencies or [sizes["concurrency"]]:
            runs += equal_work(eng, cont, wide, c, rounds=sizes["wide_rounds"],
                               max_wait_ms=max_wait_ms, progress=progress)
        device = _device_of(eng)
    finally:
        if cont_owned:
            cont.close()
        if owned:
            eng.close()
    doc = bench_document("batching", runs, engine=eng.name, model=eng.model_name, device=device,
                         continuous_engine=cont_name, max_wait_ms=max_wait_ms, sizes=sizes)
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
    TTFT, TPOT and E2E (s) flattened into columns (``ttft_p50_s``, ``e2e_p99_s``, ...); list
    fields (``e2e_by_output``) are left out."""
    import pandas as pd

    rows = []
    for run in document["runs"]:
        row = {k: v for k, v in run.items() if not isinstance(v, dict | list)}
        for metric in ("ttft_s", "tpot_s", "e2e_s"):
            for q in ("p50", "p90", "p99"):
                row[f"{metric[:-2]}_{q}_s"] = run[metric][q]
        rows.append(row)
    return pd.DataFrame(rows)
