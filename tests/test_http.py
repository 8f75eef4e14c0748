"""The OpenAI-compatible server: a real uvicorn on 127.0.0.1, driven by the official client.

Every test that starts a server is slow (the bundled model's through the conftest hook)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from fakes import FakeEngine

from labkit.serving.cache import AsyncResponseCache
from labkit.serving.http import BackgroundServer
from labkit.serving.service import InferenceService

MODEL = "smollm2-135m"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(hf_engine):
    service = InferenceService(hf_engine, AsyncResponseCache(MODEL, "lru"), model_name=MODEL,
                               max_batch_size=8, max_wait_ms=5)
    with BackgroundServer(service) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_completion_with_the_openai_client(client):
    out = client.completions.create(model=MODEL, prompt="The capital of France is",
                                    max_tokens=4, temperature=0)
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
    assert out.choices[0].text.strip() and out.choices[0].finish_reason in ("stop", "length")
    assert 1 <= out.usage.completion_tokens <= 4 and out.usage.prompt_tokens > 0


def test_chat_completion_and_its_stream_agree(client):
    out = client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=8,
                                         temperature=0)
    text = out.choices[0].message.content
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert text.startswith("The capital of France is")
    chunks = list(client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=8,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    m = httpx.get(server.url + "/metrics").json()
    assert m["completed"] >= 1 and "p99" in m["latency_s"] and "batching" in m


def test_malformed_json_is_a_400_with_a_message(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "x", "messages": [',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "malformed JSON" in r.json()["error"]["message"]


def test_unknown_model_is_a_404_naming_both_models(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=CAPITAL, max_tokens=4)
    assert "gpt-9" in str(err.value) and MODEL in str(err.value)


def test_max_tokens_below_one_is_a_400_naming_the_field_and_range(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=0)
    body = err.value.body
    assert body["param"] == "max_tokens" and "[1, 4096]" in body["message"]


@pytest.mark.slow
def test_overload_is_a_503_and_the_server_recovers():
    engine = FakeEngine(step_s=0.02, held=True, model=MODEL)
    service = InferenceService(engine, model_name=MODEL, max_batch_size=1, max_wait_ms=0,
                               max_queue=1)
    body = {"model": MODEL, "prompt": "a b", "max_tokens": 2}

    async def burst(url):
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            first = asyncio.create_task(http.post("/v1/completions", json=body))
            await asyncio.sleep(0.3)  # in the engine, held at the gate
            rest = [asyncio.create_task(http.post("/v1/completions", json=body))
                    for _ in range(3)]
            await asyncio.sleep(0.3)
            engine.gate.set()
            return await asyncio.gather(first, *rest)

    with BackgroundServer(service) as srv:
        replies = asyncio.run(burst(srv.url))
        later = httpx.post(srv.url + "/v1/completions", json=body)
    codes = sorted(r.status_code for r in replies)
    assert codes == [200, 200, 503, 503]  # 1 running + max_queue=1 waiting; 2 turned away
    rejected = next(r for r in replies if r.status_code == 503)
    assert "max_queue=1" in rejected.json()["error"]["message"]
    assert rejected.headers["retry-after"] == "1"
    assert later.status_code == 200 and later.json()["choices"][0]["text"] == "a b"


@pytest.mark.slow
def test_client_that_hangs_up_mid_stream_does_not_break_others():
    engine = FakeEngine(step_s=0.05, model=MODEL)
    service = InferenceService(engine, model_name=MODEL, max_batch_size=4, max_wait_ms=50)
    words = "one two three four five six seven eight"

    def body(prompt, stream):
        return {"model": MODEL, "prompt": prompt, "max_tokens": 8, "stream": stream}

    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            other = asyncio.create_task(http.post("/v1/completions", json=body(words, False)))
            async with http.stream("POST", "/v1/completions", json=body("q " + words, True)) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        first = json.loads(line[6:])["choices"][0]["text"]
                        break  # hang up after the first token
            return first, (await other).json()["choices"][0]["text"]

    with BackgroundServer(service) as srv:
        first, other_text = asyncio.run(main(srv.url))
        m = httpx.get(srv.url + "/metrics").json()
    assert first == "q" and other_text == words
    assert m["cancelled"] == 1 and m["errors"] == 0  # the server noticed the hang-up
    assert m["batching"]["batch_size_counts"] == {"2": 1}  # and the two shared one batch


@pytest.mark.slow
def test_serve_bench_times_every_streamed_token(tmp_path):
    from labkit.bench.serve import run_serve_bench
    from labkit.engines import Request
    from labkit.widgets import LoadTestView

    engine = FakeEngine(step_s=0.01, model=MODEL)
    service = InferenceService(engine, model_name=MODEL, max_batch_size=4, max_wait_ms=5)
    workload = [Request(prompt=f"w{i} b c d e", max_tokens=5, request_id=f"b{i}")
                for i in range(8)]
    view = LoadTestView(widgets=False)
    with BackgroundServer(service) as srv:
        doc = run_serve_bench(srv.url, concurrencies=[1, 4], workload=workload, warmup=1,
                              json_path=tmp_path / "serve.json", view=view)
    assert doc["bench"] == "serve" and doc["engine"] == "fake" and doc["model"] == MODEL
    assert json.loads((tmp_path / "serve.json").read_text())["runs"] == doc["runs"]
    one, four = doc["runs"]
    assert (one["concurrency"], four["concurrency"]) == (1, 4)
    for run in doc["runs"]:
        assert run["num_requests"] == 8 and run["failed"] == 0 and run["output_tokens"] == 40
        assert 0 < run["ttft_s"]["p50"] < run["e2e_s"]["p50"]
        assert 0.005 < run["itl_s"]["p50"] < 0.2  # one chunk per 10 ms engine step
    assert four["requests_per_s"] > 1.5 * one["requests_per_s"]  # batching over HTTP pays
    assert view.history and view.history[-1]["done"] == 8


def test_load_sender_keeps_each_client_pool_small(monkeypatch):
    """256 requests at once go over 16 httpx clients, at most 16 open on any one: one pool of
    hundreds of connections made the load generator the bottleneck (see load_sender)."""
    from collections import Counter

    from labkit.bench import client
    from labkit.engines import Request

    open_now, peak = Counter(), Counter()

    def counting_sender(client, model, stream=True):
        async def send(request):
            open_now[id(client)] += 1
            peak[id(client)] = max(peak[id(client)], open_now[id(client)])
            await asyncio.sleep(0.02)
            open_now[id(client)] -= 1
            return request.request_id
        return send

    monkeypatch.setattr(client, "openai_sender", counting_sender)

    async def main():
        async with client.load_sender("http://127.0.0.1:9", MODEL, in_flight=256) as send:
            return await asyncio.gather(*(send(Request(prompt="x", max_tokens=1, request_id=str(i)))
                                          for i in range(256)))

    assert asyncio.run(main()) == [str(i) for i in range(256)]
    assert len(peak) == 16 and max(peak.values()) == 16


@pytest.mark.slow
@pytest.mark.parametrize("server_cache, expect_hits", [(False, 0), (True, 8 + 8)])
def test_serve_bench_times_the_model_not_the_cache_unless_asked(server_cache, expect_hits):
    """A cache-on labkit server and a workload replayed per run: by default every request
    carries Cache-Control: no-cache and reaches the engine; ``server_cache=True`` lets the
    second and third passes (warm-up was the first) be answered from the cache."""
    from labkit.bench.serve import run_serve_bench
    from labkit.engines import Request

    engine = FakeEngine(step_s=0.005, model=MODEL)
    service = InferenceService(engine, AsyncResponseCache(MODEL, "lru"), model_name=MODEL,
                               max_batch_size=8, max_wait_ms=5)
    workload = [Request(prompt=f"w{i} b c", max_tokens=3, request_id=f"c{i}") for i in range(8)]
    with BackgroundServer(service) as srv:
        doc = run_serve_bench(srv.url, concurrencies=[2, 4], workload=workload, warmup=8,
                              server_cache=server_cache)
        m = httpx.get(srv.url + "/metrics").json()
    assert [r["cache_hits"] for r in doc["runs"]] == [expect_hits // 2] * 2
    assert all(r["server_cache"] is server_cache for r in doc["runs"])
    assert sum(engine.batch_sizes) == 24 - expect_hits  # warm-up + two runs of 8
    assert m["cache_hits"] == expect_hits


def test_no_cache_header_skips_the_response_cache(server):
    body = {"model": MODEL, "messages": CAPITAL, "max_tokens": 4, "temperature": 0}
    httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)  # stores it
    cached = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    fresh = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60,
                       headers={"Cache-Control": "no-cache"}).json()
    assert cached["labkit"]["cache_hit"] and not fresh["labkit"]["cache_hit"]
    assert fresh["choices"][0]["message"] == cached["choices"][0]["message"]


@pytest.mark.slow
def test_bad_requests_and_a_500_leave_the_keep_alive_connection_usable():
    """Over one HTTP/1.1 connection: each bad request (a 413 and a 500 too) gets its OpenAI
    error and the next request on the same socket is answered (a 500 used to reset it)."""
    import http.client

    from test_faults import BAD, FailingEngine, completion

    engine = FailingEngine(step_s=0.001, max_model_len=64)
    service = InferenceService(engine, model_name=completion()["model"], max_wait_ms=0)
    good = json.dumps(completion())
    with BackgroundServer(service, max_body_bytes=4096) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        conn.connect()
        sock = conn.sock
        for what, method, path, body, status, _param, _text in BAD:
            payload = body if isinstance(body, bytes) or body is None else json.dumps(body)
            conn.request(method, path, body=payload, headers={"content-type": "application/json"})
            r = conn.getresponse()
            assert r.status == status and "error" in json.loads(r.read()), what
            conn.request("POST", "/v1/completions", body=good,
                         headers={"content-type": "application/json"})
            after = conn.getresponse()
            assert after.status == 200 and json.loads(after.read())["choices"][0]["text"] == \
                "a b c", what
            assert conn.sock is sock, f"{what}: the server closed the connection"
        conn.close()


@pytest.mark.slow
def test_a_client_that_hangs_up_without_streaming_frees_its_slot():
    """A non-streamed request whose client gives up (timeout) is cancelled in the engine: the
    one slot of a continuous engine is free again at once, not after the 4 s generation."""
    words = " ".join(f"w{i}" for i in range(200))
    engine = FakeEngine(reply="{prompt} " + words, step_s=0.02, continuous=True, model=MODEL)
    service = InferenceService(engine, model_name=MODEL, max_batch_size=1)
    with BackgroundServer(service) as srv:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", timeout=0.5,
                       json={"model": MODEL, "prompt": "long", "max_tokens": 200})
        t0 = time.perf_counter()
        r = httpx.post(srv.url + "/v1/completions", timeout=10,
                       json={"model": MODEL, "prompt": "short", "max_tokens": 1})
        took = time.perf_counter() - t0
        m = httpx.get(srv.url + "/metrics").json()
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "short"
    assert took < 1.5 and len(engine.aborted) == 1 and m["cancelled"] == 1
