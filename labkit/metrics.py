"""Every serving metric defined once, with vLLM's definitions, and the bench JSON contract.

Definitions (all times in seconds, per request unless said otherwise):

- TTFT  time to first token: first output token's time minus the request's start.
- TPOT  time per output token, *excluding the first*: (last token time - first token time) /
        (output tokens - 1). Undefined (not counted) for requests with fewer than 2 tokens.
- ITL   inter-token latency: every gap between two consecutive output tokens of a request,
        pooled over all requests.
- E2E   end-to-end latency: completion ready minus request start.
- request throughput      completed requests / wall time of the run (req/s).
- output token throughput generated tokens / wall time of the run (tok/s).
- SLO attainment          the fraction of requests that met every given SLO limit (e.g.
                          ttft_s <= 0.5 and tpot_s <= 0.03); a failed request meets none.
- goodput                 requests (and their output tokens) that met every limit / wall time
                          of the run (req/s, tok/s): DistServe's per-request SLO view, computed
                          as vLLM's ``--goodput`` does (a request with < 2 tokens has TPOT 0).
- cost per million tokens USD per hour of the machine / (tokens/s x 3600) x 1e6, at the run's
                          output throughput and at its goodput (the tokens that met the SLO).

These follow vLLM's ``benchmark_serving`` (its ``mean_tpot_ms`` also excludes the first token).
One detail differs: vLLM takes TPOT's numerator as E2E - TTFT, labkit as last - first token time.
They agree when a response ends with its last token; they part where the response ends later, as
in a static batch (each request finishes with its batch) or over HTTP (a trailing usage chunk).
Other tools differ more: some call TPOT "ITL" or include the first token; say which you quote.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

STATS_KEYS = ("mean", "p50", "p90", "p99")
SLO_KEYS = ("ttft_s", "tpot_s", "e2e_s")  # per-request metrics an SLO can limit (seconds)
BENCH_KINDS = ("latency", "batching", "cache", "quant", "serve")  # ``labkit bench KIND``


def stats(values: Iterable[float | None]) -> dict[str, float]:
    """mean, p50, p90, p99 of the defined values; NaN for each when there are none."""
    vals = np.array([v for v in values if v is not None], dtype=float)
    if vals.size == 0:
        return {k: math.nan for k in STATS_KEYS}
    p50, p90, p99 = np.percentile(vals, [50, 90, 99])
    return {"mean": float(vals.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(completions: Sequence, duration_s: float, *, name: str,
              batch_size: int | None = None, concurrency: int | None = None,
              request_rate: float | None = None, slo: dict[str, float] | None = None,
              failed: int | None = None, **extra) -> dict:
    """One ``runs[]`` entry of the bench JSON contract from completions and the run's wall time.

    ``completions`` need ``ttft_s``, ``tpot_s``, ``itl_s``, ``e2e_s`` and ``output_tokens`` (the
    engines' ``Completion`` has them). ``slo`` maps a metric name (``SLO_KEYS``) to a limit in
    seconds; a request counts towards goodput if it meets all of them (``meets_slo``), and the
    run gets ``slo``, ``slo_attainment``, ``goodput_requests_per_s`` and
    ``goodput_output_tokens_per_s``. ``failed`` (given: a field of the run): requests that got
    no answer, not in ``completions`` nor in the statistics; they count against
    ``slo_attainment``.
    """
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s!r}")
    n = len(completions)
    tokens = sum(c.output_tokens for c in completions)
    run = {
        "name": name,
        "batch_size": batch_size,
        "concurrency": concurrency,
        "request_rate": request_rate,
        "num_requests": n,
        "output_tokens": tokens,
        "duration_s": duration_s,
        "requests_per_s": n / duration_s,
        "output_tokens_per_s": tokens / duration_s,
        "ttft_s": stats(c.ttft_s for c in completions),
        "tpot_s": stats(c.tpot_s for c in completions),
        "itl_s": stats(gap for c in completions for gap in c.itl_s),
        "e2e_s": stats(c.e2e_s for c in completions),
    }
    if failed is not None:
        run["failed"] = failed
    if slo:
        good = [c for c in completions if meets_slo(c, slo)]
        asked = n + (failed or 0)
        run["slo"] = dict(slo)
        run["slo_attainment"] = len(good) / asked if asked else math.nan
        run["goodput_requests_per_s"] = len(good) / duration_s
        run["goodput_output_tokens_per_s"] = sum(c.output_tokens for c in good) / duration_s
    run.update(extra)
    return run


def check_slo(slo: dict[str, float]) -> dict[str, float]:
    """``slo`` if every key is one of ``SLO_KEYS`` and every limit a number > 0 (seconds)."""
    for key, limit in slo.items():
        if key not in SLO_KEYS:
            raise ValueError(f"unknown SLO metric {key!r}; choose from: {', '.join(SLO_KEYS)}")
        if not (isinstance(limit, (int, float)) and limit > 0):
            raise ValueError(f"SLO limit {key}={limit!r} must be a number of seconds > 0")
    return slo


def meets_slo(completion, slo: dict[str, float]) -> bool:
    """True if the request met every limit of ``slo`` (metric name -> seconds, ``SLO_KEYS``).

    Like vLLM, a request with fewer than 2 tokens has TPOT 0 here; one with no token has no
    TTFT and fails a TTFT limit.
    """
    for key, limit in check_slo(slo).items():
        value = getattr(completion, key)
        if key == "tpot_s" and value is None:
            value = 0.0
        if value is None or value > limit:
            return False
    return True


def usd_per_million_tokens(tokens_per_s: float, usd_per_hour: float) -> float:
    """What a million tokens cost (USD) at ``tokens_per_s`` on a machine of ``usd_per_hour``
    USD/hour: ``usd_per_hour / (tokens_per_s * 3600) * 1e6``; inf when no token was made."""
    if not (isinstance(usd_per_hour, (int, float)) and usd_per_hour >= 0):
        raise ValueError(f"GPU cost must be >= 0 USD per hour, got {usd_per_hour!r}")
    if tokens_per_s <= 0:
        return math.inf
    return usd_per_hour / (tokens_per_s * 3600.0) * 1e6


def bench_document(kind: str, runs: list[dict], *, engine: str, model: str,
                   device: str | None = None, **extra) -> dict:
    """The whole bench JSON object around a list of runs: the contract's fixed top-level fields
    (bench, device, engine, model, labkit_version, created) plus ``extra``."""
    from labkit import __version__
    from labkit.device import device_name

    if kind not in BENCH_KINDS:
        raise ValueError(f"unknown bench kind {kind!r}; choose one of: {', '.join(BENCH_KINDS)}")
    return {
        "bench": kind,
        "device": device or device_name(),
        "engine": engine,
        "model": model,
        "labkit_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "runs": runs,
        **extra,
    }


def requests_frame(completions: Sequence):
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
