"""The server under bad input and faults: every input error is a 4xx in OpenAI's error format,
work per request is bounded (context, body size, deadline, cancellation), a dead Redis costs
nothing but hits and comes back, and shutdown is bounded. Fake engines unless a model matters."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis
from fakes import FakeEngine
from fastapi.testclient import TestClient

from labkit.engines import Request
from labkit.engines.base import ABORTED, InvalidRequest
from labkit.serving.batchers import BatcherClosed
from labkit.serving.cache import AsyncResponseCache
from labkit.serving.http import create_app
from labkit.serving.service import DeadlineExceeded, InferenceService

MODEL = "fake-model"
LONG = " ".join(f"w{i}" for i in range(200))  # a 200-token reply at FakeEngine's word per token


class FailingEngine(FakeEngine):
    """A FakeEngine whose generate raises for the prompt "boom" (an engine bug, not bad input)."""

    def generate(self, requests, on_token=None):
        if any(r.prompt == "boom" for r in requests):
            raise RuntimeError("engine exploded")
        return super().generate(requests, on_token)


def app_client(engine=None, **service_kw) -> TestClient:
    engine = engine or FailingEngine(step_s=0.001, max_model_len=64, model=MODEL)
    service = InferenceService(engine, model_name=MODEL, max_wait_ms=0, **service_kw)
    return TestClient(create_app(service, max_body_bytes=4096), raise_server_exceptions=False)


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "a b c", "max_tokens": 3, **fields}


JSON = {"content-type": "application/json"}
# (what, method, path, body bytes or JSON object, status, param, text in the message)
BAD = [
    ("invalid UTF-8", "POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400, None, "UTF-8"),
    ("unknown route", "POST", "/v1/nope", {}, 404, None, "Invalid URL (POST /v1/nope)"),
    ("wrong method", "GET", "/v1/completions", None, 405, None, "allowed: POST"),
    ("empty prompt in a list", "POST", "/v1/completions", completion(prompt=[""]), 400, "prompt",
     "must not be empty"),
    ("a seed beyond 64 bits", "POST", "/v1/completions", completion(seed=2**70), 400, "seed",
     "2**63"),
    ("a lone surrogate", "POST", "/v1/chat/completions",
     b'{"model": "fake-model", "messages": [{"role": "user", "content": "\\ud800"}]}', 400,
     "messages", "surrogate"),
    ("max_tokens: true", "POST", "/v1/completions", completion(max_tokens=True), 400,
     "max_tokens", "valid integer"),
    ("max_tokens as a string", "POST", "/v1/completions", completion(max_tokens="3"), 400,
     "max_tokens", "valid integer"),
    ("temperature: 'NaN'", "POST", "/v1/completions", completion(temperature="NaN"), 400,
     "temperature", "valid number"),
    ("an empty stop string", "POST", "/v1/completions", completion(stop=""), 400, "stop",
     "must not be empty"),
    ("an empty stop string in a list", "POST", "/v1/completions", completion(stop=["x", ""]),
     400, "stop", "must not be empty"),
    ("prompt + max_tokens beyond the context", "POST", "/v1/completions",
     completion(prompt=" ".join(["w"] * 60), max_tokens=10), 400, "prompt",
     "60 prompt tokens + max_tokens 10 exceed max_model_len 64"),
    ("a body over max_body_bytes", "POST", "/v1/completions", completion(prompt="w " * 3000),
     413, None, "at most 4096 bytes"),
    ("an engine failure", "POST", "/v1/completions", completion(prompt="boom"), 500, None,
     "engine exploded"),
]


@pytest.mark.parametrize("what, method, path, body, status, param, text", BAD,
                         ids=[case[0] for case in BAD])
def test_bad_input_is_an_openai_error_and_the_server_stays_healthy(what, method, path, body,
                                                                   status, param, text):
    with app_client() as client:
        kw = {"content": body, "headers": JSON} if isinstance(body, bytes) else \
            {"json": body} if body is not None else {}
        r = client.request(method, path, **kw)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param and text in error["message"], error
        assert error["type"] == ("server_error" if status == 500 else "invalid_request_error")
        after = client.post("/v1/completions", json=completion())
        assert after.status_code == 200 and after.json()["choices"][0]["text"] == "a b c"


def test_context_error_has_openais_code_and_names_both_numbers_and_the_limit():
    with app_client() as client:
        r = client.post("/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 20,
            "messages": [{"role": "user", "content": " ".join(["w"] * 50)}]})
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded"
    assert error["param"] == "messages"
    assert "50 prompt tokens + max_tokens 20 exceed max_model_len 64" in error["message"]


def test_a_chunked_body_over_the_limit_is_a_413_too():
    def chunks():
        yield b'{"model": "fake-model", "prompt": "'
        for _ in range(10):
            yield b"w " * 500
        yield b'"}'

    with app_client() as client:
        r = client.post("/v1/completions", content=chunks(), headers=JSON)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_a_streamed_request_that_fails_before_its_first_token_gets_a_status_not_a_stream():
    with app_client() as client:
        r = client.post("/v1/completions",
                        json=completion(prompt=" ".join(["w"] * 60), max_tokens=10, stream=True))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_a_generation_past_the_deadline_is_stopped_and_answered_504():
    engine = FakeEngine(reply=LONG, step_s=0.01, model=MODEL)
    with app_client(engine, deadline_s=0.3) as client:
        t0 = time.perf_counter()
        r = client.post("/v1/completions", json=completion(prompt="x", max_tokens=200))
        took = time.perf_counter() - t0
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert took < 1.5  # 200 steps of 10 ms would be 2 s
    assert engine.aborted and "of max_tokens 200" in r.json()["error"]["message"]


def test_the_deadline_stops_the_engine_and_nothing_is_cached():
    engine = FakeEngine(reply=LONG, step_s=0.01)
    cache = AsyncResponseCache("fake", "lru")

    async def main():
        async with InferenceService(engine, cache, deadline_s=0.2) as service:
            with pytest.raises(DeadlineExceeded, match="deadline"):
                await service.handle(Request(prompt="x", max_tokens=200))
            return service.metrics()

    m = asyncio.run(main())
    assert m["deadline_exceeded"] == 1 and m["errors"] == 0
    assert len(cache.backend) == 0  # a partial answer is never stored
    assert len(engine.aborted) == 1


@pytest.mark.parametrize("continuous", [False, True])
def test_a_caller_that_leaves_frees_its_slot(continuous):
    """One slot, a 2 s generation: the caller leaves after 0.2 s, the engine stops it, and the
    next request is served at once instead of after the first one's 2 s."""
    engine = FakeEngine(reply="{prompt} " + LONG, step_s=0.01, continuous=continuous)

    async def main():
        async with InferenceService(engine, max_batch_size=1, max_wait_ms=0) as service:
            first = asyncio.create_task(service.handle(Request(prompt="x", max_tokens=200,
                                                               request_id="leaver")))
            await asyncio.sleep(0.2)
            first.cancel()
            t0 = time.perf_counter()
            second = await service.handle(Request(prompt="short answer", max_tokens=2))
            return second, time.perf_counter() - t0

    second, took = asyncio.run(main())
    assert second.text == "short answer" and took < 1.0
    assert engine.aborted == ["leaver"]


def test_identical_requests_share_a_generation_until_the_last_one_leaves():
    engine = FakeEngine(reply="{prompt} " + LONG, step_s=0.01)
    cache = AsyncResponseCache("fake", "lru")

    async def main():
        async with InferenceService(engine, cache) as service:
            req = dict(prompt="same", max_tokens=20)
            a = asyncio.create_task(service.handle(Request(**req)))
            b = asyncio.create_task(service.handle(Request(**req)))
            await asyncio.sleep(0.05)
            a.cancel()  # b still wants the answer: the generation runs on
            done = await b
            c = asyncio.create_task(service.handle(Request(prompt="other", max_tokens=20)))
            await asyncio.sleep(0.05)
            c.cancel()  # its only caller left: stopped, not stored
            await asyncio.sleep(0.1)
            return done, service.metrics()

    done, m = asyncio.run(main())
    assert done.completion.output_tokens == 20 and not done.cache_hit
    assert m["coalesced"] == 1 and len(engine.aborted) == 1 and len(cache.backend) == 1


def test_shutdown_cancels_a_long_generation_after_its_timeout():
    engine = FakeEngine(reply=LONG, step_s=0.05)  # 10 s if it ran to the end

    async def main():
        service = InferenceService(engine)
        task = asyncio.create_task(service.handle(Request(prompt="x", max_tokens=200)))
        await asyncio.sleep(0.2)
        t0 = time.perf_counter()
        await service.aclose(timeout_s=0.2)
        with pytest.raises(BatcherClosed):
            await task
        return time.perf_counter() - t0

    assert asyncio.run(main()) < 1.0 and len(engine.aborted) == 1


def test_engine_check_refuses_empty_and_too_long_prompts_before_any_work():
    engine = FakeEngine(max_model_len=10)
    with pytest.raises(InvalidRequest, match="the prompt is empty"):
        engine.check(Request(prompt="   "))
    with pytest.raises(InvalidRequest, match="8 prompt tokens \\+ max_tokens 4 exceed "
                                             "max_model_len 10") as err:
        engine.check(Request(prompt=" ".join("abcdefgh"), max_tokens=4))
    assert err.value.code == "context_length_exceeded" and engine.batch_sizes == []


@pytest.mark.parametrize("bad, param", [
    (dict(prompt="x", seed=2**64), "seed"),
    (dict(prompt="x", stop=["ok", ""]), "stop"),
    (dict(prompt="caf\ud800"), "prompt"),
    (dict(messages=[{"role": "user", "content": "\udfff"}]), "messages"),
    (dict(prompt="x", max_tokens=True), "max_tokens"),
])
def test_request_refuses_what_the_tokenizer_or_sampler_would_choke_on(bad, param):
    with pytest.raises(InvalidRequest) as err:
        Request(**bad)
    assert err.value.param == param


class FlakyBackend:
    """An in-memory backend that can be switched off: every call then raises a Redis error."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise redis.ConnectionError("Connection refused (fake)")

    def get(self, key):
        self._check()
        return self.data.get(key)

    def set(self, key, value, ttl_s):
        self._check()
        self.data[key] = value

    def clear(self, prefix):
        self._check()
        return 0

    def ping(self):
        self._check()

    def reset(self):
        pass

    def close(self):
        pass


def test_health_and_metrics_show_a_cache_outage_and_the_recovery():
    backend = FlakyBackend()
    cache = AsyncResponseCache("fake", backend, retry_after_s=0.05)

    async def main():
        async with InferenceService(FakeEngine(), cache) as service:
            req = dict(prompt="a b", max_tokens=2)
            await service.handle(Request(**req))
            backend.down = True
            with pytest.warns(RuntimeWarning, match="cache backend unreachable"):
                during = await service.handle(Request(**req))  # fails open: generated
            health_down, metrics_down = await service.health(), service.metrics()
            backend.down = False
            await asyncio.sleep(0.06)
            health_up = await service.health()  # the probe finds the backend back
            await service.handle(Request(**req))
            after = await service.handle(Request(**req))
            return during, health_down, metrics_down, health_up, after

    during, down, m, up, after = asyncio.run(main())
    assert not during.cache_hit and during.text == "a b"
    assert down["status"] == "degraded" and down["cache"].startswith("degraded: ")
    assert "Connection refused" in down["cache"]
    assert m["cache_errors"] >= 1 and m["cache_outages"] == 1 and m["errors"] == 0
    assert m["cache_state"].startswith("degraded")
    assert up == {"status": "ok", "cache": "ok"} and after.cache_hit


def test_cache_bench_with_an_unreachable_redis_fails_before_any_work(monkeypatch):
    from labkit.bench.caching import run_cache_bench
    from labkit.serving.redis_server import free_port

    engine = FakeEngine()
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    with pytest.raises(RuntimeError, match="cannot use the Redis cache") as err:
        run_cache_bench(engine, "fake", num_requests=4, url=url, progress=False)
    assert "\n" not in str(err.value) and "secret" not in str(err.value)
    assert engine.batch_sizes == []  # not even the warm-up ran


@pytest.mark.slow
def test_cache_bench_with_a_wrong_redis_password_fails_before_any_work():
    from labkit.bench.caching import run_cache_bench
    from labkit.serving.redis_server import EmbeddedRedis

    engine = FakeEngine()
    with EmbeddedRedis(password="right-one") as server:
        url = server.url.replace(":right-one@", ":hunter2x@")
        with pytest.raises(RuntimeError, match="cannot use the Redis cache.*Authentication") as err:
            run_cache_bench(engine, "fake", num_requests=4, url=url, progress=False)
    assert "hunter2x" not in str(err.value) and "\n" not in str(err.value)
    assert engine.batch_sizes == []


def test_cli_cache_bench_with_a_bad_redis_url_is_one_line_and_exit_2(monkeypatch, capsys):
    from labkit.cli import main
    from labkit.serving.redis_server import free_port

    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert main(["bench", "cache", "--engine", "hf", "--num-requests", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("labkit bench: error: cannot use the Redis cache") and "\n" not in err


def test_cache_bench_that_loses_its_backend_mid_run_still_writes_its_json(tmp_path):
    from labkit.bench.caching import run_cache_bench
    from labkit.metrics import write_json

    backend = FlakyBackend()

    class DyingEngine(FakeEngine):
        def generate(self, requests, on_token=None):
            if len(self.batch_sizes) == 3:  # the warm-up and two misses went fine
                backend.down = True
            return super().generate(requests, on_token)

    with pytest.warns(RuntimeWarning, match="cache backend unreachable"):
        doc = run_cache_bench(DyingEngine(tokens=2, step_s=0.001), "fake", num_requests=12,
                              backend=backend, progress=False)
    write_json(doc, tmp_path / "cache.json")
    written = json.loads((tmp_path / "cache.json").read_text())
    assert written["cache_errors"] >= 1 and "not cleared" in written["degraded"]
    assert written["backend"] == "FlakyBackend"
    assert sum(r["num_requests"] for r in written["runs"] if r["name"] != "workload") == 12


def test_an_aborted_completion_says_so():
    engine = FakeEngine(reply=LONG, step_s=0.001)
    req = Request(prompt="x", max_tokens=200)
    req.cancel()
    [done] = engine.generate([req])
    assert done.finish_reason == ABORTED and done.output_tokens == 0


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:cache backend unreachable:RuntimeWarning")
def test_kill_9_of_the_embedded_redis_under_load_fails_no_request_and_hits_come_back():
    """Four clients loop over eight greedy prompts (hits once stored) through a real server and
    Redis; one second in, the Redis is killed with SIGKILL. No request fails (the cache fails
    open), /health says degraded meanwhile, the server restarts on its port, hits are back
    within 5 s and /metrics counts the outage."""
    import os
    import signal

    import httpx

    from labkit.serving.http import BackgroundServer
    from labkit.serving.redis_server import EmbeddedRedis

    server = EmbeddedRedis(restart=True).start()
    engine = FakeEngine(step_s=0.002, tokens=2, model=MODEL)
    service = InferenceService(engine, AsyncResponseCache(MODEL, "redis", url=server.url),
                               model_name=MODEL, max_wait_ms=1)
    results: list[tuple[float, int, bool]] = []  # (when, status, cache hit)
    health: list[str] = []
    killed = {}

    async def load(url: str) -> None:
        end = time.perf_counter() + 4.0
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            async def client(k: int) -> None:
                while time.perf_counter() < end:
                    body = completion(prompt=f"p{k % 8}", max_tokens=2, temperature=0)
                    r = await http.post("/v1/completions", json=body)
                    hit = r.status_code == 200 and r.json()["labkit"][0]["cache_hit"]
                    results.append((time.perf_counter(), r.status_code, hit))
                    k += 1

            async def killer() -> None:
                await asyncio.sleep(1.0)
                killed["pid"], killed["t"] = server.pid, time.perf_counter()
                os.kill(server.pid, signal.SIGKILL)
                while time.perf_counter() < killed["t"] + 1.5:
                    health.append((await http.get("/health")).json()["cache"])
                    await asyncio.sleep(0.02)

            await asyncio.gather(killer(), *(client(k) for k in range(4)))

    try:
        with BackgroundServer(service) as srv:
            asyncio.run(load(srv.url))
            m = httpx.get(srv.url + "/metrics").json()
            final = httpx.get(srv.url + "/health").json()
        restarted = server.restarts
    finally:
        server.stop()
    assert len(results) > 100 and {status for _, status, _ in results} == {200}
    hits_after = [t for t, _, hit in results if hit and t > killed["t"]]
    assert hits_after and hits_after[0] - killed["t"] < 5.0
    assert any(h.startswith("degraded: ") for h in health) and health[-1] == "ok"
    assert restarted == 1 and final["status"] == "ok" and final["cache"] == "ok"
    assert m["cache_outages"] == 1 and m["cache_errors"] >= 1 and m["errors"] == 0


@pytest.mark.slow
def test_labkit_serve_exits_within_10_s_of_sigterm_during_long_requests():
    """``labkit serve --engine hf`` with the bundled model and the embedded Redis: a
    200,000-character prompt is a 400 at once (beyond the context); SIGTERM while such a
    request and a 4,000-token generation are in flight ends the server within 10 s (drain, then
    cancel), and the embedded Redis and its folder are gone with it."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    from pathlib import Path

    import httpx

    from labkit.processes import descendants, wait_gone
    from labkit.serving.redis_server import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from labkit.cli import main; sys.exit(main())",
         "serve", "--engine", "hf", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).json()["cache"] == "ok":
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        huge = {"model": "smollm2-135m", "max_tokens": 200,
                "messages": [{"role": "user", "content": "word " * 40_000}]}  # 200,000 chars
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", json=huge, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert time.perf_counter() - t0 < 5
        [redis] = [p for p in descendants(proc.pid)
                   if os.readlink(f"/proc/{p}/exe").endswith("redis-server")]
        folder = Path(os.readlink(f"/proc/{redis}/cwd"))
        long = {"model": "smollm2-135m", "prompt": "Count to a thousand:", "max_tokens": 4000,
                "ignore_eos": True, "temperature": 0}
        for body, path in [(long, "/v1/completions"), (huge, "/v1/chat/completions")]:
            threading.Thread(target=lambda b=body, p=path: _quietly(httpx.post, url + p, json=b,
                                                                    timeout=30),
                             daemon=True).start()
        time.sleep(1.5)  # both in flight: one generating, one tokenizing or answered
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        assert time.perf_counter() - t0 < 10
        assert not wait_gone([redis], 3.0) and not folder.exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def _quietly(fn, *args, **kwargs) -> None:
    """``fn(*args, **kwargs)``, ignoring the HTTP error a server that shuts down may cause."""
    import httpx

    try:
        fn(*args, **kwargs)
    except httpx.HTTPError:
        pass


def test_metrics_before_any_request_is_strict_json():
    """A statistic with no value yet (no request served) is null, not NaN (which is no JSON)."""
    with app_client() as client:
        r = client.get("/metrics")
    assert r.status_code == 200
    assert r.json()["latency_s"]["p99"] is None and "NaN" not in r.text
