"""SLOs for load tests: ``--slo`` text, the MLPerf presets, the knee of a rate sweep, the cost.

An SLO is a dict of per-request limits in seconds over ``labkit.metrics.SLO_KEYS``, e.g.
``{"ttft_s": 0.5, "tpot_s": 0.03}``; ``labkit.metrics.summarize`` marks each request as meeting
it or not and adds SLO attainment and goodput to the run. On the command line it is written in
milliseconds, like vLLM's ``--goodput``: ``--slo ttft_ms=500,tpot_ms=30[,e2e_ms=4000]``, or a
preset by name:

| preset                    | TTFT  | TPOT   | where it comes from                        |
|---------------------------|-------|--------|--------------------------------------------|
| ``mlperf-8b``             | 2 s   | 100 ms | MLPerf Inference, Llama-3.1-8B, Server     |
| ``mlperf-8b-interactive`` | 0.5 s | 30 ms  | the same, its interactive Server scenario  |

(``llama3_1-8b`` and ``llama3_1-8b-interactive`` in mlcommons/inference ``loadgen/mlperf.conf``,
where they bound the 99th percentile of TTFT and of TPOT.) They were set for an 8B model on data
centre GPUs: on a laptop CPU they say only that a CPU is not such a server.

The knee of a sweep over offered rates (``find_knee``) is the capacity at the SLO: the highest
rate up to which every run met each limit at its 99th percentile (MLPerf's Server criterion,
applied per rate) and answered every request. Past it, queueing makes latency grow with time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from labkit.metrics import SLO_KEYS, check_slo, usd_per_million_tokens

SLO_PRESETS: dict[str, dict[str, float]] = {
    "mlperf-8b": {"ttft_s": 2.0, "tpot_s": 0.100},
    "mlperf-8b-interactive": {"ttft_s": 0.5, "tpot_s": 0.030},
}
SLO_PERCENTILE = "p99"  # the statistic of a run the knee compares with each limit
_MS_KEYS = {key.removesuffix("_s") + "_ms": key for key in SLO_KEYS}  # ttft_ms -> ttft_s


def parse_slo(text: str) -> tuple[str, dict[str, float]]:
    """``(name, slo)`` from ``--slo`` text: a preset name, or ``ttft_ms=500,tpot_ms=30,...``
    (milliseconds; keys ``ttft_ms``, ``tpot_ms``, ``e2e_ms``). The name is the preset's, or the
    text as given. Errors name the bad part and what is allowed."""
    text = text.strip()
    if text in SLO_PRESETS:
        return text, dict(SLO_PRESETS[text])
    if "=" not in text:
        raise ValueError(f"unknown SLO preset {text!r}; choose one of: "
                         f"{', '.join(SLO_PRESETS)}, or limits like ttft_ms=500,tpot_ms=30")
    slo = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key.strip() not in _MS_KEYS:
            raise ValueError(f"unknown SLO key {key.strip()!r} in {text!r}; choose from: "
                             f"{', '.join(_MS_KEYS)} (milliseconds)")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"SLO {key.strip()}={value!r}: expected a number of milliseconds "
                             "> 0") from None
        if not ms > 0 or math.isinf(ms):
            raise ValueError(f"SLO {key.strip()}={value!r}: must be a number of milliseconds "
                             "> 0")
        slo[_MS_KEYS[key.strip()]] = ms / 1e3
    return text, check_slo(slo)


def parse_rates(text: str) -> list[float]:
    """``"1,2,4,inf"`` -> ``[1.0, 2.0, 4.0, inf]`` (requests/s, each > 0)."""
    rates = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        try:
            rate = float(part)
        except ValueError:
            raise ValueError(f"request rate {part!r} is not a number; give requests/s > 0 "
                             "like 1,2,4,8 (or inf)") from None
        if not rate > 0:
            raise ValueError(f"request rate {part!r} must be > 0 requests/s (or inf), as in "
                             "1,2,4,8")
        rates.append(rate)
    if not rates:
        raise ValueError(f"no request rate in {text!r}; give requests/s > 0 like 1,2,4,8")
    return rates


def parse_cost(text: str | float) -> float:
    """A machine price in USD per hour (>= 0), from text or a number."""
    try:
        usd = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"GPU cost {text!r} is not a number; give USD per hour >= 0, "
                         "e.g. 2.5") from None
    if not (usd >= 0 and math.isfinite(usd)):
        raise ValueError(f"GPU cost {text!r} must be >= 0 USD per hour, e.g. 2.5")
    return usd


def meets_at_p99(run: dict, slo: dict[str, float]) -> bool:
    """True if the run's p99 of every limited metric is within its limit and no request failed.

    A TPOT that no request defined (every output one token long) meets its limit, as in
    ``labkit.metrics.meets_slo``; an undefined TTFT (no token at all) does not.
    """
    if run.get("failed"):
        return False
    for key, limit in check_slo(slo).items():
        value = run[key][SLO_PERCENTILE]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            if key != "tpot_s":
                return False
            continue
        if value > limit:
            return False
    return True


def find_knee(runs: Sequence[dict], slo: dict[str, float]) -> float | None:
    """The capacity at the SLO: the highest ``request_rate`` up to which every run (in rate
    order) meets ``slo`` at p99 (``meets_at_p99``); None if the lowest rate already misses."""
    knee = None
    for run in sorted(runs, key=lambda r: r["request_rate"]):
        if not meets_at_p99(run, slo):
            break
        knee = run["request_rate"]
    return knee


def knee_record(runs: Sequence[dict], slo: dict[str, float], slo_name: str | None) -> dict:
    """The ``knee`` object of a serve bench document: the rate (req/s, or None), the SLO and
    how it was applied (its percentile), and the throughput and goodput of the knee's run."""
    rate = find_knee(runs, slo)
    at = next((r for r in runs if r["request_rate"] == rate), None) if rate else None
    return {"request_rate": rate, "slo": dict(slo), "slo_name": slo_name,
            "percentile": SLO_PERCENTILE,
            "output_tokens_per_s": at["output_tokens_per_s"] if at else None,
            "goodput_output_tokens_per_s": at.get("goodput_output_tokens_per_s") if at else None}


def add_cost(run: dict, usd_per_hour: float) -> dict:
    """Add the cost fields to a run (in place; returns it): ``gpu_usd_per_hour``,
    ``usd_per_million_output_tokens`` (at its output throughput) and, with an SLO,
    ``usd_per_million_goodput_tokens`` (per million tokens of requests that met it; inf,
    written as null, when none did)."""
    run["gpu_usd_per_hour"] = parse_cost(usd_per_hour)
    run["usd_per_million_output_tokens"] = usd_per_million_tokens(run["output_tokens_per_s"],
                                                                  run["gpu_usd_per_hour"])
    if "goodput_output_tokens_per_s" in run:
        run["usd_per_million_goodput_tokens"] = usd_per_million_tokens(
            run["goodput_output_tokens_per_s"], run["gpu_usd_per_hour"])
    return run
