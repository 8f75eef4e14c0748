"""Load generators keep their promises (count, concurrency, rate); workloads and the latency bench
produce what the bench JSON contract says."""

from __future__ import annotations

import asyncio
import json
import math
import statistics

import pytest

from labkit import metrics
from labkit.bench import latency, loadgen, workloads
from labkit.cli.commands import int_list
from labkit.engines.base import Completion, Request, now
from labkit.metrics import STATS_KEYS


class FakeServer:
    """An async sender with known timing: ``ttft`` s to the first token, ``gap`` s per next."""

    def __init__(self, ttft: float = 0.01, gap: float = 0.002) -> None:
        self.ttft, self.gap = ttft, gap
        self.in_flight = self.max_in_flight = self.calls = 0

    async def send(self, request: Request) -> Completion:
        start = now()
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.ttft)
            times = [now()]
            for _ in range(request.max_tokens - 1):
                await asyncio.sleep(self.gap)
                times.append(now())
        finally:
            self.in_flight -= 1
        return Completion(request_id=request.request_id, text="", token_ids=[0] * len(times),
                          prompt_tokens=3, finish_reason="length", start_s=start,
                          token_times_s=times, end_s=now())


def requests(n: int, max_tokens: int = 3) -> list[Request]:
    return [Request(prompt=f"p{i}", max_tokens=max_tokens, request_id=f"q{i}") for i in range(n)]


def test_closed_loop_sends_every_request_at_the_requested_concurrency():
    server = FakeServer()
    reqs = requests(24)
    result = asyncio.run(loadgen.closed_loop(server.send, reqs, concurrency=4))
    assert server.calls == 24
    assert [c.request_id for c in result.completions] == [r.request_id for r in reqs]
    assert server.max_in_flight == result.max_in_flight == 4
    # 24 requests / 4 clients = 6 rounds of at least ttft + 2 gaps each
    assert result.duration_s >= 6 * (0.01 + 2 * 0.002)


def test_closed_loop_with_more_clients_than_requests_sends_each_once():
    server = FakeServer()
    result = asyncio.run(loadgen.closed_loop(server.send, requests(3), concurrency=10))
    assert server.calls == 3 and result.max_in_flight == 3


def test_open_loop_arrivals_follow_the_requested_rate():
    rate, n = 200.0, 200  # 5 ms gaps: a loaded CI core keeps up with them
    arrivals = loadgen.arrival_times(n, rate, seed=7)
    assert arrivals == loadgen.arrival_times(n, rate, seed=7)  # seeded: reproducible
    assert arrivals != loadgen.arrival_times(n, rate, seed=8)  # and the seed is used
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
    assert statistics.fmean(b - a for a, b in zip(arrivals, arrivals[1:])) == \
        pytest.approx(1 / rate, rel=0.15)

    server = FakeServer(ttft=0.005, gap=0.001)
    result = asyncio.run(loadgen.open_loop(server.send, requests(n), rate=rate, seed=7))
    assert server.calls == len(result.completions) == n
    sent = result.send_times_s
    assert statistics.fmean(b - a for a, b in zip(sent, sent[1:])) == \
        pytest.approx(1 / rate, rel=0.15)
    assert result.request_rate == rate


def test_open_loop_does_not_wait_for_replies():
    # replies take 0.2 s but requests arrive every ~10 ms: many must be in flight together
    server = FakeServer(ttft=0.2, gap=0.0)
    result = asyncio.run(loadgen.open_loop(server.send, requests(20, max_tokens=1), rate=100.0))
    assert result.max_in_flight >= 10


def test_ttft_never_exceeds_e2e_and_queueing_counts_from_send_time():
    server = FakeServer()
    result = asyncio.run(loadgen.closed_loop(server.send, requests(8), concurrency=2))
    for c in result.completions:
        assert 0 < c.ttft_s <= c.e2e_s
    frame = metrics.requests_frame(result.completions)
    assert (frame["ttft_s"] <= frame["e2e_s"]).all()
    assert list(frame["output_tokens"]) == [3] * 8


def test_summary_throughput_equals_tokens_over_wall_time():
    server = FakeServer()
    result = asyncio.run(loadgen.closed_loop(server.send, requests(10, max_tokens=5), 5))
    run = result.summary("closed", slo={"ttft_s": 1.0})
    assert run["output_tokens_per_s"] == pytest.approx(50 / result.duration_s)
    assert run["requests_per_s"] == pytest.approx(10 / result.duration_s)
    assert run["concurrency"] == 5 and run["goodput_requests_per_s"] == run["requests_per_s"]


def test_run_sync_works_inside_a_running_event_loop():
    async def inside():
        return loadgen.run_sync(asyncio.sleep(0, result="ok"))
    assert asyncio.run(inside()) == "ok"


@pytest.mark.parametrize("dist", ["fixed", "uniform", "lognormal"])
def test_workload_is_seeded_and_lengths_stay_in_range(dist):
    a = workloads.make_workload(40, seed=3, min_output_tokens=4, max_output_tokens=64,
                            output_len_dist=dist)
    b = workloads.make_workload(40, seed=3, min_output_tokens=4, max_output_tokens=64,
                            output_len_dist=dist)
    other = workloads.make_workload(40, seed=4, min_output_tokens=4, max_output_tokens=64,
                                    output_len_dist=dist)
    assert [(r.messages, r.max_tokens) for r in a] == [(r.messages, r.max_tokens) for r in b]
    assert [r.messages for r in a] != [r.messages for r in other]  # the seed shuffles prompts
    if dist != "fixed":
        assert [r.max_tokens for r in a] != [r.max_tokens for r in other]  # and draws lengths
    assert all(4 <= r.max_tokens <= 64 and r.ignore_eos for r in a)
    if dist == "fixed":
        assert {r.max_tokens for r in a} == {64}


def test_lognormal_lengths_vary_widely():
    lens = workloads.output_lengths(500, 8, 512, "lognormal", seed=1)
    assert lens == workloads.output_lengths(500, 8, 512, "lognormal", seed=1)
    assert lens != workloads.output_lengths(500, 8, 512, "lognormal", seed=2)
    assert max(lens) >= 8 * min(lens)
    assert statistics.median(lens) < statistics.fmean(lens)  # right-skewed: a long tail


def test_bad_workload_arguments_name_the_allowed_values():
    with pytest.raises(ValueError, match="choose one of: fixed, uniform, lognormal"):
        workloads.make_workload(4, output_len_dist="normal")
    with pytest.raises(ValueError, match="32,128"):
        int_list("32,abc")


def test_prompts_file_has_varied_lengths_and_categories():
    rows = workloads.load_prompts()
    assert len(rows) >= 50
    assert all(set(r) == {"prompt", "category"} for r in rows)
    lengths = sorted(len(r["prompt"]) for r in rows)
    assert lengths[0] < 20 and lengths[-1] > 1000  # from "Hi" to a page of text


def test_latency_bench_on_cpu_writes_the_contract(hf_engine, tmp_path):
    path = tmp_path / "latency.json"
    doc = latency.run_latency_bench(hf_engine, num_requests=2, prompt_lens=(8, 24), out_lens=(4,),
                                  json_path=path, progress=False)
    assert json.loads(path.read_text()) == json.loads(json.dumps(doc))
    assert doc["bench"] == "latency" and doc["device"] == "cpu" and doc["engine"] == "hf"
    assert doc["model"] == "smollm2-135m" and doc["labkit_version"] and doc["created"]
    assert len(doc["runs"]) == 2
    for run in doc["runs"]:
        assert run["name"] == "latency" and run["num_requests"] == 2
        assert run["output_tokens"] == 2 * 4  # ignore_eos: exactly out_len tokens each
        assert run["output_tokens_per_s"] == pytest.approx(run["output_tokens"] /
                                                           run["duration_s"])
        for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            assert set(run[key]) == set(STATS_KEYS)
        assert run["ttft_s"]["p50"] <= run["e2e_s"]["p50"]
    short, long = doc["runs"]
    assert abs(short["prompt_tokens"] - 8) <= 2 and abs(long["prompt_tokens"] - 24) <= 2


def test_engine_sender_queueing_shows_in_ttft(hf_engine):
    # two clients, one engine thread: the second request waits for the first, and its TTFT
    # (measured from when it was sent) includes that wait
    send = loadgen.engine_sender(hf_engine)
    reqs = [Request(prompt="Count to ten.", max_tokens=3, ignore_eos=True) for _ in range(2)]
    result = asyncio.run(loadgen.closed_loop(send, reqs, concurrency=2))
    first, second = sorted(result.completions, key=lambda c: c.end_s)
    assert result.max_in_flight == 2
    assert [c.output_tokens for c in (first, second)] == [3, 3]
    assert second.ttft_s >= first.e2e_s - 0.01


def test_bench_json_is_strict_with_undefined_stats_as_null(tmp_path):
    doc = {"bench": "cache", "runs": [{"name": "hit", "tpot_s": {"mean": math.nan, "p50": 0.5},
                                       "ratio": [math.inf, 1.0], "n": 3}]}
    text = metrics.write_json(doc, tmp_path / "sub" / "b.json").read_text()

    def no_constants(name):
        raise ValueError(f"not JSON: {name}")

    back = json.loads(text, parse_constant=no_constants)
    assert back["runs"][0] == {"name": "hit", "tpot_s": {"mean": None, "p50": 0.5},
                               "ratio": [None, 1.0], "n": 3}
    assert math.isnan(doc["runs"][0]["tpot_s"]["mean"])  # the caller's document is unchanged


def test_workloads_past_the_prompt_pool_stay_distinct():
    pool = [r["prompt"] for r in workloads.load_prompts()]
    reqs = workloads.make_workload(2 * len(pool) + 5, min_output_tokens=4, max_output_tokens=4,
                               chat=False)
    prompts = [r.prompt for r in reqs]
    assert len(set(prompts)) == len(prompts)
    assert sorted(prompts[:len(pool)]) == sorted(pool)       # the first pass is the pool as is
    assert prompts[len(pool)].startswith(f"(request {len(pool)}) ")


@pytest.fixture(scope="module")
def bundled_tokenizer():
    from labkit.models import load_tokenizer, resolve

    return load_tokenizer(resolve("smollm2-135m"))


def _shared_prefix_tokens(tokenizer, prompts: list[str]) -> int:
    """The longest token prefix any two of ``prompts`` share."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    longest = 0
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            n = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            longest = max(longest, n)
    return longest


def test_distinct_prompts_share_no_prefix_and_keep_their_length(bundled_tokenizer):
    prompts = latency.distinct_prompts(bundled_tokenizer, 64, 12) + \
        latency.distinct_prompts(bundled_tokenizer, 64, 12)  # a second call: new prompts too
    assert len(set(prompts)) == 24
    assert _shared_prefix_tokens(bundled_tokenizer, prompts) < 4  # vLLM caches blocks of 16
    for p in prompts:
        assert abs(len(bundled_tokenizer(p, add_special_tokens=False)["input_ids"]) - 64) <= 2


def test_latency_and_decode_benches_never_repeat_a_prompt(bundled_tokenizer, monkeypatch):
    # an engine with prefix caching would serve a repeated prompt's prefill from its cache
    from fakes import FakeEngine

    engine = FakeEngine(tokens=4, step_s=0.0, tokenizer=bundled_tokenizer)
    monkeypatch.setattr(latency, "roofline_fields", lambda *a, **k: {})
    monkeypatch.setattr(latency, "engine_device", lambda eng: "cpu")
    latency.run_latency_bench(engine, num_requests=3, prompt_lens=(16, 32), out_lens=(4,),
                              warmup=1, progress=False)
    latency.decode_sweep(engine, [1, 4], prompt_len=16, out_len=4, progress=False)
    prompts = [r.prompt for r in engine.received if r.prompt != "Hello"]  # Hello: warmup()
    assert len(prompts) == 2 * (1 + 3) + 2 * (1 + 4)
    assert len(set(prompts)) == len(prompts)
    assert _shared_prefix_tokens(bundled_tokenizer, prompts) < 8


def test_latency_bench_interleaves_the_shapes(bundled_tokenizer, monkeypatch):
    # round robin: a burst of load on a shared machine hits every shape, not one
    from fakes import FakeEngine

    engine = FakeEngine(tokens=4, step_s=0.0, tokenizer=bundled_tokenizer)
    monkeypatch.setattr(latency, "roofline_fields", lambda *a, **k: {})
    monkeypatch.setattr(latency, "engine_device", lambda eng: "cpu")
    doc = latency.run_latency_bench(engine, num_requests=3, prompt_lens=(16,), out_lens=(2, 3),
                                    warmup=0, progress=False)
    assert [r.max_tokens for r in engine.received] == [2, 3] * 3  # warmup=0: no warm-up calls
    for run in doc["runs"]:
        assert run["num_requests"] == 3 and run["duration_s"] > 0
        for metric in ("ttft", "tpot", "e2e"):  # the fastest request, beside the percentiles
            assert 0 < run[f"{metric}_min_s"] <= run[f"{metric}_s"]["p50"]
