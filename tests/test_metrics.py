"""Every serving metric from hand-made timestamps with known answers (vLLM's definitions)."""

from __future__ import annotations

import math

import pytest

from labkit.engines.base import Completion
from labkit.metrics import STATS_KEYS, bench_document, stats, summarize


def completion(start: float, token_times: list[float], end: float | None = None,
               rid: str = "r") -> Completion:
    """A completion whose tokens arrived at ``token_times`` (s) for a request sent at ``start``."""
    return Completion(request_id=rid, text="x" * len(token_times),
                      token_ids=list(range(len(token_times))), prompt_tokens=5,
                      finish_reason="length", start_s=start, token_times_s=token_times,
                      end_s=end if end is not None else (token_times[-1] if token_times else start))


def test_ttft_is_first_token_minus_start():
    assert completion(10.0, [10.5, 10.7, 10.9]).ttft_s == pytest.approx(0.5)


def test_tpot_excludes_the_first_token():
    # 4 tokens: the first after 1.0 s of prefill, then 3 gaps of 0.1 s -> TPOT 0.1, not 1.3/4
    c = completion(0.0, [1.0, 1.1, 1.2, 1.3])
    assert c.tpot_s == pytest.approx(0.1)
    assert c.e2e_s / c.output_tokens == pytest.approx(0.325)  # the naive "per token" is wrong


def test_itl_is_every_gap_between_tokens():
    assert completion(0.0, [1.0, 1.1, 1.4]).itl_s == pytest.approx([0.1, 0.3])


def test_e2e_uses_completion_ready_time():
    assert completion(2.0, [2.5, 3.0], end=3.25).e2e_s == pytest.approx(1.25)


def test_one_token_request_has_ttft_but_no_tpot_or_itl():
    c = completion(0.0, [0.4], end=0.5)
    assert c.ttft_s == pytest.approx(0.4)
    assert c.tpot_s is None
    assert c.itl_s == []
    assert c.e2e_s == pytest.approx(0.5)


def test_zero_token_request_has_no_ttft_tpot_or_itl():
    c = completion(0.0, [], end=0.2)
    assert (c.ttft_s, c.tpot_s, c.itl_s, c.output_tokens) == (None, None, [], 0)
    assert c.e2e_s == pytest.approx(0.2)


def test_stats_percentiles_of_known_values():
    s = stats([float(v) for v in range(1, 101)])  # 1..100
    assert s["mean"] == pytest.approx(50.5)
    assert s["p50"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)
    assert s["p99"] == pytest.approx(99.01)


def test_stats_skip_undefined_values_and_are_nan_when_none_left():
    assert stats([None, 2.0, None, 4.0])["mean"] == pytest.approx(3.0)
    assert all(math.isnan(v) for v in stats([None, None]).values())
    assert tuple(stats([]).keys()) == STATS_KEYS


def test_summary_pools_metrics_over_requests():
    runs = [completion(0.0, [1.0, 1.1, 1.2], rid="a"),    # ttft 1.0, tpot 0.1
            completion(0.0, [0.5, 0.8], rid="b"),         # ttft 0.5, tpot 0.3
            completion(0.0, [0.2], rid="c"),              # one token: ttft only
            completion(0.0, [], end=0.1, rid="d")]        # zero tokens
    s = summarize(runs, duration_s=2.0, name="t")
    assert s["num_requests"] == 4 and s["output_tokens"] == 6
    assert s["ttft_s"]["mean"] == pytest.approx((1.0 + 0.5 + 0.2) / 3)
    assert s["tpot_s"]["mean"] == pytest.approx((0.1 + 0.3) / 2)
    assert s["itl_s"]["mean"] == pytest.approx((0.1 + 0.1 + 0.3) / 3)
    assert s["e2e_s"]["mean"] == pytest.approx((1.2 + 0.8 + 0.2 + 0.1) / 4)


def test_summary_throughput_is_tokens_over_wall_time():
    runs = [completion(0.0, [0.1 * k for k in range(1, 11)], rid=str(i)) for i in range(3)]
    s = summarize(runs, duration_s=4.0, name="t")
    assert s["output_tokens_per_s"] == pytest.approx(30 / 4.0)
    assert s["requests_per_s"] == pytest.approx(3 / 4.0)


def test_goodput_counts_requests_meeting_every_slo():
    runs = [completion(0.0, [0.2, 0.3, 0.4], rid="fast"),   # ttft 0.2, tpot 0.1: good
            completion(0.0, [0.9, 1.0, 1.1], rid="slow-first"),  # ttft 0.9: bad
            completion(0.0, [0.2, 0.7, 1.2], rid="slow-decode"),  # tpot 0.5: bad
            completion(0.0, [0.3], rid="one-token")]        # no TPOT: counts as 0, like vLLM
    s = summarize(runs, duration_s=2.0, name="t", slo={"ttft_s": 0.5, "tpot_s": 0.2})
    assert s["goodput_requests_per_s"] == pytest.approx(2 / 2.0)
    assert s["slo"] == {"ttft_s": 0.5, "tpot_s": 0.2}


def test_zero_token_request_fails_a_ttft_slo():
    s = summarize([completion(0.0, [], end=0.1)], duration_s=1.0, name="t", slo={"ttft_s": 1.0})
    assert s["goodput_requests_per_s"] == 0.0


def test_summary_rejects_non_positive_wall_time():
    with pytest.raises(ValueError, match="duration_s"):
        summarize([completion(0.0, [0.1])], duration_s=0.0, name="t")


def test_bench_document_has_the_contract_fields_and_names_bad_kinds():
    doc = bench_document("latency", [], engine="hf", model="m", device="cpu")
    assert {"bench", "device", "engine", "model", "labkit_version", "created", "runs"} <= set(doc)
    with pytest.raises(ValueError, match="choose one of: latency"):
        bench_document("latncy", [], engine="hf", model="m")
