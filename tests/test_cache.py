"""Exact response cache: stable keys, TTL, namespaces, fail-open, workloads and the cache bench."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from fakes import FakeEngine

from labkit.bench.caching import (
    prefix_sharing_ttft,
    run_cache_bench,
    simulate_hit_ratio,
    zipf_workload,
)
from labkit.engines.base import Request
from labkit.serving import redis_server
from labkit.serving.cache import AsyncResponseCache, ResponseCache
from labkit.serving.cache_backends import LRUBackend
from labkit.serving.keys import cache_key
from labkit.serving.redis_server import EmbeddedRedis, get_client

pytest.importorskip("redis")
ROOT = Path(__file__).resolve().parents[1]
VALUE = {"text": "The capital of France is Paris.", "token_ids": [1, 2, 3],
         "finish_reason": "stop", "prompt_tokens": 7}


@pytest.fixture(scope="module")
def server():
    """One private Redis for the module; afterwards it (and the default one) must be gone.
    redis-server is a process: the tests that use one are marked slow."""
    with EmbeddedRedis() as srv:
        yield srv
    pid = srv.pid
    redis_server.stop_default()
    assert not redis_server._live
    assert pid is None or not Path(f"/proc/{pid}").exists()


@pytest.fixture
def cache(server):
    c = ResponseCache("smollm2-135m", url=server.url)
    yield c
    c.clear()


def q(prompt="What is the capital of France?", **kw) -> Request:
    return Request(prompt=prompt, max_tokens=kw.pop("max_tokens", 16), **kw)


# -- keys --------------------------------------------------------------------------------------
KEY_SCRIPT = """
from labkit.engines.base import Request
from labkit.serving.keys import cache_key
prompt = "What is the capital of France?"
print(cache_key("smollm2-135m", Request(prompt=prompt, max_tokens=16)))
print(hash(prompt))
"""


def test_keys_equal_across_processes():
    """sha256 keys agree between processes; hash() keys do not (PYTHONHASHSEED salts them)."""
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", KEY_SCRIPT], env=env, cwd=ROOT, text=True,
                             capture_output=True, check=True).stdout.split()
        outs.append(out)
    (key1, hash1), (key2, hash2) = outs
    assert key1 == key2 == cache_key("smollm2-135m", q())
    assert hash1 != hash2


def test_key_layout_and_what_changes_it():
    key = cache_key("meta-llama/Llama-3.1-8B", q())
    assert re.fullmatch(r"labkit:meta-llama_Llama-3\.1-8B:[0-9a-f]{64}", key)
    base = cache_key("m", q())
    assert cache_key("m", q(temperature=0)) == cache_key("m", q(temperature=0.0)) == base
    assert cache_key("m", q(stop=["b", "a"])) == cache_key("m", q(stop=["a", "b"]))
    for changed in (cache_key("other", q()), cache_key("m", q("What is the capital of Spain?")),
                    cache_key("m", q(max_tokens=17)), cache_key("m", q(stop=["."])),
                    cache_key("m", q(temperature=0.7, seed=1)), cache_key("m", q(top_p=0.9)),
                    cache_key("m", Request(messages=[{"role": "user",
                                                      "content": "What is the capital of France?"}],
                                           max_tokens=16))):
        assert changed.split(":")[-1] != base.split(":")[-1]
    assert cache_key("m", q(temperature=0.7, seed=1)) != cache_key("m", q(temperature=0.7, seed=2))


# -- in-process LRU ----------------------------------------------------------------------------
def test_lru_evicts_least_recently_used():
    lru = LRUBackend(capacity=2)
    lru.set("a", "1", None)
    lru.set("b", "2", None)
    assert lru.get("a") == "1"  # a is now the most recent
    lru.set("c", "3", None)
    assert lru.get("b") is None and lru.get("a") == "1" and lru.get("c") == "3"


def test_lru_ttl_with_simulated_clock():
    now = [0.0]
    cache = ResponseCache("m", LRUBackend(clock=lambda: now[0]), ttl_s=10)
    key = cache.key(q())
    cache.put(key, VALUE)
    now[0] = 9.9
    assert cache.get(key) == VALUE
    now[0] = 10.0
    assert cache.get(key) is None


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="'memcached'.*redis, lru"):
        ResponseCache("m", "memcached")


# -- Redis -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_hit_returns_json_value_and_counts(cache, server):
    key = cache.key(q())
    assert cache.get(key) is None
    assert cache.put(key, VALUE)
    assert cache.get(key) == VALUE
    raw = get_client(server.url).get(key)
    assert json.loads(raw) == VALUE  # plain JSON in Redis, readable by any language
    s = cache.counters
    assert (s.hits, s.misses, s.tokens_saved) == (1, 1, 3)
    assert len(s.hit_latency_s) == 1 and 0 < s.hit_latency_s[0] < 0.5


@pytest.mark.slow
def test_sampled_requests_are_not_cached_unless_asked(cache, server):
    sampled = q(temperature=0.8, seed=7)
    assert cache.key(sampled) is None and cache.counters.skipped == 1  # no key: never stored
    opted_in = ResponseCache("smollm2-135m", url=server.url, cache_sampled=True)
    key = opted_in.key(sampled)
    assert opted_in.put(key, VALUE) and opted_in.get(key) == VALUE


@pytest.mark.slow
def test_redis_ttl_expiry(server):
    cache = ResponseCache("smollm2-135m", url=server.url, ttl_s=0.3)
    key = cache.key(q())
    cache.put(key, VALUE)
    assert cache.get(key) == VALUE
    time.sleep(0.45)
    assert cache.get(key) is None


@pytest.mark.slow
def test_sub_millisecond_ttl_is_stored_not_refused(server):
    cache = ResponseCache("smollm2-135m", url=server.url, ttl_s=0.0004, ns="tiny-ttl")
    key = cache.key(q())
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # PX 0 would be a Redis error -> a warning
        assert cache.put(key, VALUE)
    time.sleep(0.01)
    assert cache.get(key) is None and cache.counters.errors == 0


@pytest.mark.slow
def test_unreadable_entry_or_redis_refusal_is_a_miss_not_a_crash(server):
    cache = ResponseCache("smollm2-135m", url=server.url, ns="damaged")
    key = cache.key(q())
    get_client(server.url).set(key, "{not json")
    with pytest.warns(RuntimeWarning, match="unreadable cache entry"):
        assert cache.get(key) is None
    assert cache.counters.misses == 1
    # A server error other than a lost connection (here: a wrong-type key) fails open too.
    get_client(server.url).delete(key)
    get_client(server.url).lpush(key, "x")
    with pytest.warns(RuntimeWarning, match="WRONGTYPE"):
        assert cache.get(key) is None
    cache.clear()


@pytest.mark.slow
def test_namespaces_keep_models_apart(server):
    a = ResponseCache("model-a", url=server.url)
    b = ResponseCache("model-b", url=server.url)
    key_a, key_b = a.key(q()), b.key(q())
    a.put(key_a, VALUE)
    assert b.get(key_b) is None
    b.put(key_b, {**VALUE, "text": "b"})
    assert a.clear() == 1
    assert a.get(key_a) is None and b.get(key_b)["text"] == "b"
    b.clear()


@pytest.mark.slow
def test_external_server_with_password_and_db():
    with EmbeddedRedis(password="pw") as ext:
        url = f"redis://:pw@127.0.0.1:{ext.port}/3"
        cache = ResponseCache("smollm2-135m", url=url)
        key = cache.key(q())
        cache.put(key, VALUE)
        assert cache.get(key) == VALUE
        assert get_client(url).exists(key)
        assert not get_client(url.replace("/3", "/0")).exists(key)


@pytest.mark.slow
def test_cache_fails_open_when_redis_dies():
    port = redis_server.free_port()
    srv = EmbeddedRedis(port=port).start()
    cache = ResponseCache("smollm2-135m", url=srv.url, retry_after_s=0.2)
    key = cache.key(q())
    try:
        cache.put(key, VALUE)
        assert cache.get(key) == VALUE
        srv.stop()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = [cache.get(key) for _ in range(5)] + [cache.put(key, VALUE)]
        assert results == [None] * 5 + [False]  # misses, the caller goes on to the engine
        assert len([w for w in caught if "unreachable" in str(w.message)]) == 1  # once per outage
        srv = EmbeddedRedis(port=port).start()  # back, same address, empty
        time.sleep(0.25)
        assert cache.put(key, VALUE)
        assert cache.get(key) == VALUE
        assert cache.counters.outages == 1
    finally:
        srv.stop()


@pytest.mark.slow
def test_async_cache_hits_and_fails_open():
    async def scenario(srv):
        cache = AsyncResponseCache("smollm2-135m", url=srv.url, retry_after_s=0)
        key = cache.key(q())
        assert await cache.get(key) is None
        await cache.put(key, VALUE)
        assert await cache.get(key) == VALUE
        srv.stop()
        with pytest.warns(RuntimeWarning, match="unreachable"):
            assert await cache.get(key) is None
        await cache.aclose()
        lru = AsyncResponseCache("m", "lru", capacity=4)
        await lru.put(lru.key(q()), VALUE)
        return await lru.get(lru.key(q()))

    with EmbeddedRedis() as srv:
        assert asyncio.run(scenario(srv)) == VALUE


def test_no_pickle_in_labkit():
    """Cached values are JSON: no module of labkit may serialise with pickle."""
    pattern = re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle)\b"
                         r"|\bpickle\.(loads?|dumps?)")
    offenders = [f"{path}:{i}" for path in (ROOT / "labkit").rglob("*.py")
                 for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


# -- workload and bench ------------------------------------------------------------------------
@pytest.mark.parametrize("repeat_fraction", [0.0, 0.3, 0.5, 0.9])
def test_workload_repeats_exactly_the_asked_fraction(repeat_fraction):
    stream = zipf_workload(200, repeat_fraction, seed=3)
    assert stream == zipf_workload(200, repeat_fraction, seed=3)  # deterministic
    other = zipf_workload(200, repeat_fraction, seed=4)  # the seed picks which repeat, and when
    assert (stream != other) == (repeat_fraction > 0)  # without repeats nothing is drawn
    repeats = len(stream) - len(set(stream))
    assert repeats == round(repeat_fraction * 200)
    assert abs(simulate_hit_ratio(stream) - repeat_fraction) <= 1 / 400


def test_hit_ratio_grows_with_cache_size_and_ttl():
    stream = zipf_workload(400, 0.6, seed=1)
    by_size = [simulate_hit_ratio(stream, capacity=k) for k in (1, 8, 64, None)]
    assert by_size == sorted(by_size) and by_size[0] < 0.1 < by_size[-1]
    by_ttl = [simulate_hit_ratio(stream, ttl_s=t) for t in (1, 20, 1e9)]
    assert by_ttl == sorted(by_ttl) and by_ttl[0] < by_ttl[-1]


@pytest.mark.slow
def test_cache_bench_contract_and_acceptance(server):
    # 4 tokens in 100 ms per request: a hit through Redis takes 0.1-0.5 ms (more when make
    # test's other worker holds the CPU), so the 100x bound has room.
    engine = FakeEngine(tokens=4, step_s=0.025)
    doc = run_cache_bench(engine, "sleepy", num_requests=60, repeat_fraction=0.5,
                          url=server.url, progress=False)
    assert doc["bench"] == "cache" and doc["engine"] == "fake"
    runs = {r["name"]: r for r in doc["runs"]}
    assert set(runs) == {"miss", "hit", "workload"}
    for run in runs.values():
        assert {"num_requests", "duration_s", "ttft_s", "tpot_s", "itl_s", "e2e_s"} <= set(run)
    assert runs["hit"]["e2e_s"]["p50"] * 100 <= runs["miss"]["e2e_s"]["p50"]
    assert abs(runs["workload"]["hit_ratio"] - 0.5) <= 0.01
    assert runs["workload"]["tokens_saved"] == 4 * runs["hit"]["num_requests"]
    assert sum(engine.batch_sizes) == runs["miss"]["num_requests"] + 1  # + the warm-up
    assert not list(get_client(server.url).scan_iter("labkit:sleepy-bench-*"))  # cleaned up


@pytest.mark.slow
def test_cache_bench_with_bundled_model(hf_engine, server):
    doc = run_cache_bench(hf_engine, "smollm2-135m", num_requests=8, repeat_fraction=0.5,
                          max_tokens=4, url=server.url, progress=False)
    runs = {r["name"]: r for r in doc["runs"]}
    assert runs["miss"]["output_tokens"] > 0  # chat requests: the instruct model answers
    assert runs["hit"]["e2e_s"]["p50"] * 100 <= runs["miss"]["e2e_s"]["p50"]
    assert abs(runs["workload"]["hit_ratio"] - 0.5) <= 0.01


def test_prefix_sharing_ttft_sends_shared_prefix_prompts():
    engine = FakeEngine(tokens=4, step_s=0.001)
    ttfts = prefix_sharing_ttft(engine, num_requests=3, prefix_sentences=5)
    seen = [r.messages for r in engine.received]
    assert len(ttfts) == 3 and all(t > 0 for t in ttfts)
    assert len({m[-1]["content"] for m in seen}) == 3  # three different questions ...
    assert len({m[0]["content"] for m in seen}) == 1  # ... after one shared prefix
    assert len(seen[0][0]["content"]) > 200


def test_prefix_conversations_share_the_system_prompt_only_when_asked():
    from labkit.bench.caching import prefix_conversations

    shared = prefix_conversations(3, prefix_sentences=4)
    unique = prefix_conversations(3, prefix_sentences=4, shared=False)
    assert len({m[0]["content"] for m in shared}) == 1
    assert len({m[0]["content"][:12] for m in unique}) == 3  # they differ from the start
    assert {len(m[0]["content"]) for m in unique} == {len(shared[0][0]["content"]) + 14}


@pytest.mark.slow
def test_kv_reuse_prefills_only_the_new_tokens_and_gives_the_same_logits():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from labkit.bench.caching import kv_reuse_ttft, prefix_conversations
    from labkit.engines.base import encode_request
    from labkit.models import load_tokenizer, resolve

    tokenizer = load_tokenizer(resolve("smollm2-135m"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)).eval()
    fed, last = [], []
    forward = model.forward

    def spy(input_ids, **kw):
        out = forward(input_ids, **kw)
        fed.append(input_ids.shape[1])
        last.append(out.logits[0, -1])
        return out

    model.forward = spy
    for shared in (True, False):
        fed.clear()
        last.clear()
        convs = prefix_conversations(3, prefix_sentences=6, shared=shared)
        ttfts = kv_reuse_ttft(model, tokenizer, convs)
        lengths = [len(encode_request(tokenizer, Request(messages=m, max_tokens=1)))
                   for m in convs]
        assert len(ttfts) == 3 and all(t > 0 for t in ttfts)
        assert fed[0] == lengths[0]
        if shared:  # later requests prefill only what follows the shared system prompt
            assert all(n < lengths[i] // 3 for i, n in enumerate(fed[1:], 1)), (fed, lengths)
        else:  # a unique prefix: nothing to reuse beyond the template's first tokens
            assert all(n >= lengths[i] - 8 for i, n in enumerate(fed)), (fed, lengths)
        with torch.inference_mode():  # reusing the KV cache changes nothing in the result
            for m, got in zip(convs, last):
                ids = encode_request(tokenizer, Request(messages=m, max_tokens=1))
                full = forward(torch.tensor([ids])).logits[0, -1]
                assert torch.allclose(got, full, atol=1e-4)
