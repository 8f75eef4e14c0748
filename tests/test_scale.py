"""Scale out on Ray Serve: two CPU replicas, one embedded Redis, the official OpenAI client.

The story the module fixture runs once (Ray start ~20-30 s on 2 cores):
1. reference answers: each of 20 prompts generated alone (batch of 1) by an hf engine here;
2. ``labkit.serving.deploy.deploy``: 2 replicas on Ray Serve (CPU), one embedded Redis for both;
3. round 1: 100 concurrent greedy chat requests (each prompt 5 times) through
   ``openai.AsyncOpenAI(base_url=...)``; round 2: the same 100 again;
4. ``shutdown()``: Serve, Ray and Redis stop; the pids they had must all be gone.
"""

from __future__ import annotations

import asyncio

import pytest

# Ray's own pydantic models warn at import (not ours to fix).
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")

MODEL = "smollm2-135m"
MAX_TOKENS = 6
N_PROMPTS, N_REQUESTS = 20, 100


def test_max_concurrent_queries_is_gone_from_ray_serve():
    """The reference design's option no longer exists: Ray Serve 2.x says max_ongoing_requests."""
    import inspect

    from ray import serve

    options = inspect.signature(serve.deployment).parameters
    assert "max_ongoing_requests" in options and "max_concurrent_queries" not in options
    with pytest.raises(TypeError, match="max_concurrent_queries"):
        serve.deployment(max_concurrent_queries=10)


def test_deploy_names_the_bad_batcher():
    from labkit.serving.deploy import deploy

    with pytest.raises(ValueError, match="unknown batcher 'ray'; choose one of: labkit, serve"):
        deploy(batcher="ray")


def test_descendants_find_a_child_and_alive_forgets_it_when_it_exits():
    import os
    import subprocess
    import sys

    from labkit.processes import alive, descendants, wait_gone

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in descendants(os.getpid())
        assert alive({child.pid}) == {child.pid}
    finally:
        child.terminate()
    assert wait_gone({child.pid}, timeout_s=10) == []


def _prompts() -> list[str]:
    from labkit.bench.workloads import load_prompts

    return [row["prompt"] for row in load_prompts()][:N_PROMPTS]


async def _round(base_url: str) -> list[dict]:
    """N_REQUESTS concurrent greedy chat completions; who served each and whether it was a hit."""
    import openai

    prompts = _prompts()
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0,
                                  timeout=120) as client:
        async def one(i: int) -> dict:
            prompt = prompts[i % len(prompts)]
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}],
                max_tokens=MAX_TOKENS, temperature=0)
            body = raw.parse()
            return {"prompt": prompt, "text": body.choices[0].message.content,
                    "replica": raw.headers["x-labkit-replica"],
                    "cache_hit": body.model_extra["labkit"]["cache_hit"]}

        return await asyncio.gather(*(one(i) for i in range(N_REQUESTS)))


@pytest.fixture(scope="module")
def scenario(hf_engine):
    from labkit.engines.base import Request, encode_request
    from labkit.serving.deploy import deploy

    refs = {}
    for prompt in _prompts():  # one at a time: the unbatched reference
        req = Request(messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS)
        [done] = hf_engine.generate([req])
        refs[prompt] = (encode_request(hf_engine.tokenizer, req), done.token_ids, done.text)
    dep = deploy(MODEL, "hf", replicas=2, num_gpus_per_replica=0, max_ongoing_requests=32,
                 max_batch_size=16, max_wait_ms=20)
    try:
        first = asyncio.run(_round(dep.base_url))
        after_first = dep.replica_metrics()
        second = asyncio.run(_round(dep.base_url))
        after_second = dep.replica_metrics()
        from labkit.serving.redis_server import get_client

        client = get_client(dep.redis_url)
        cache_keys = list(client.scan_iter(match="labkit:*"))
        client.close()
        tracked = set(dep.pids) | {m["pid"] for m in after_second.values()}
        if dep.redis is not None:
            tracked.add(dep.redis.pid)
    finally:
        left = dep.shutdown()
    return {"refs": refs, "first": first, "second": second, "after_first": after_first,
            "after_second": after_second, "cache_keys": cache_keys, "tracked": tracked,
            "left": left}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_every_answer_through_two_replicas_equals_the_unbatched_output(scenario, hf_engine):
    from labkit.equivalence import assert_same_or_near_tie

    replies = scenario["first"] + scenario["second"]
    assert len(replies) == 2 * N_REQUESTS
    for reply in replies:
        prompt_ids, ref_ids, ref_text = scenario["refs"][reply["prompt"]]
        if reply["text"] != ref_text:  # allowed only where the two best logits were tied
            got = hf_engine.tokenizer(reply["text"], add_special_tokens=False)["input_ids"]
            assert_same_or_near_tie(hf_engine.model, prompt_ids, ref_ids, got,
                                    label=f"{reply['prompt']!r} on {reply['replica']}")
    assert len({r["replica"] for r in scenario["first"]}) == 2, "the proxy used one replica only"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_second_round_is_served_from_the_shared_cache_by_both_replicas(scenario):
    second, before, after = scenario["second"], scenario["after_first"], scenario["after_second"]
    assert all(r["cache_hit"] for r in second), "a repeated greedy request missed the cache"
    hits = {rid: after[rid]["cache_hits"] - before.get(rid, {}).get("cache_hits", 0)
            for rid in after}
    assert sum(hits.values()) == N_REQUESTS, hits
    assert sum(1 for h in hits.values() if h > 0) == 2, f"hits on one replica only: {hits}"
    # One key space: each distinct prompt has one key, whichever replica generated it.
    assert len(scenario["cache_keys"]) == N_PROMPTS


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_shutdown_leaves_no_ray_or_redis_process(scenario):
    from labkit.processes import alive

    assert len(scenario["tracked"]) >= 4  # gcs_server, raylet, 2 replicas, redis-server, ...
    assert scenario["left"] == []
    assert alive(scenario["tracked"]) == set()
