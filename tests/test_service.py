"""InferenceService: each caller gets its own answer, once; cache, streaming, cancel, overload."""

from __future__ import annotations

import asyncio
import random

import pytest
from fakes import FakeEngine

from labkit.engines import Request
from labkit.engines.base import encode_request
from labkit.equivalence import assert_same_or_near_tie
from labkit.serving.batchers import BatcherClosed, Overloaded
from labkit.serving.cache import AsyncResponseCache
from labkit.serving.service import InferenceService

TOPICS = ["the moon", "bread", "rivers", "chess", "bees", "winter", "trains", "music", "salt",
          "volcanoes", "libraries", "owls", "glass", "tea", "maps", "clouds", "copper", "ants",
          "bridges", "paper"]


def lru_cache() -> AsyncResponseCache:
    return AsyncResponseCache("smollm2-135m", "lru")


def fact(topic: str) -> list[dict]:
    return [{"role": "user", "content": f"Say one short fact about {topic}."}]


def test_500_concurrent_mixed_requests_each_get_their_own_output_once(hf_engine):
    rng = random.Random(0)
    topics = TOPICS[:12]
    requests = []
    for i in range(500):
        sampled = rng.random() < 0.1
        requests.append(Request(messages=fact(topics[i % len(topics)]),
                                max_tokens=rng.choice([2, 3]),
                                temperature=0.8 if sampled else 0.0,
                                seed=7 if sampled else None, request_id=f"r{i}"))
    reference = {}  # the unbatched greedy output of each topic, long enough for any max_tokens
    for topic in topics:
        req = Request(messages=fact(topic), max_tokens=3)
        reference[topic] = (encode_request(hf_engine.tokenizer, req),
                            hf_engine.generate([req])[0].token_ids)

    async def main():
        async with InferenceService(hf_engine, lru_cache(), max_batch_size=32,
                                    max_wait_ms=20) as service:
            out = await asyncio.gather(*(service.handle(r) for r in requests))
            return out, service.metrics()

    responses, metrics = asyncio.run(main())
    assert [r.request_id for r in responses] == [r.request_id for r in requests]
    assert len({r.request_id for r in responses}) == 500  # none lost, none repeated
    assert metrics["completed"] == 500 and metrics["errors"] == 0
    assert metrics["coalesced"] > 0 and metrics["batching"]["mean_batch_size"] > 1
    eos = hf_engine.tokenizer.eos_token_id
    for i, (req, got) in enumerate(zip(requests, responses)):
        assert got.completion.output_tokens <= req.max_tokens
        if not req.greedy:
            assert not got.cache_hit, f"request {i}: a sampled output was served from the cache"
            continue
        prompt_ids, ref = reference[topics[i % len(topics)]]
        assert_same_or_near_tie(hf_engine.model, prompt_ids, ref[:req.max_tokens],
                                got.completion.token_ids, eos, label=f"request {i}")


def test_cache_hit_returns_stored_answer_and_sampled_requests_are_never_cached():
    engine = FakeEngine()

    async def main():
        async with InferenceService(engine, lru_cache(), max_wait_ms=0) as service:
            greedy = Request(prompt="alpha beta gamma", max_tokens=3)
            first = await service.handle(greedy)
            again = await service.handle(Request(prompt="alpha beta gamma", max_tokens=3))
            sampled = [await service.handle(Request(prompt="x y", temperature=0.9, seed=1))
                       for _ in range(2)]
            return first, again, sampled, service.metrics()

    first, again, sampled, m = asyncio.run(main())
    assert (first.cache_hit, again.cache_hit) == (False, True)
    assert again.text == first.text == "alpha beta gamma"
    assert again.completion.token_ids == first.completion.token_ids
    assert not any(r.cache_hit for r in sampled)
    assert (m["cache_hits"], m["cache_misses"], m["not_cached"]) == (1, 1, 2)
    assert sum(engine.batch_sizes) == 3  # the hit never reached the engine


def test_identical_requests_in_flight_share_one_generation():
    engine = FakeEngine(step_s=0.02)

    async def main():
        async with InferenceService(engine, lru_cache(), max_wait_ms=0) as service:
            streams = [service.stream(Request(prompt="same words here", request_id=f"s{i}"))
                       for i in range(3)]
            plain = [service.handle(Request(prompt="same words here", request_id=f"h{i}"))
                     for i in range(3)]

            async def collect(s):
                return [e async for e in s]

            return await asyncio.gather(*map(collect, streams), *plain), service.metrics()

    (*events, h0, h1, h2), m = asyncio.run(main())
    assert sum(engine.batch_sizes) == 1 and m["coalesced"] == 5
    for i, ev in enumerate(events):  # every stream still sees the whole text, then its own id
        assert "".join(e.text for e in ev) == "same words here"
        assert ev[-1].response.request_id == f"s{i}"
    assert [h.request_id for h in (h0, h1, h2)] == ["h0", "h1", "h2"]


def test_streaming_yields_deltas_then_the_response_with_ttft():
    async def main():
        async with InferenceService(FakeEngine(step_s=0.02), max_wait_ms=0) as service:
            return [e async for e in service.stream(Request(prompt="one two three four"))]

    events = asyncio.run(main())
    assert "".join(e.text for e in events) == "one two three four"
    assert len(events) == 5 and events[-1].response is not None
    times = [e.t_s for e in events[:-1]]
    assert times == sorted(times) and times[-1] - times[0] > 0.03  # really incremental
    assert 0 < events[-1].response.ttft_s < events[-1].response.latency_s


def test_stream_never_sends_text_past_a_stop_string():
    async def main():
        async with InferenceService(FakeEngine(), max_wait_ms=0) as service:
            req = Request(prompt="red green STOP blue", stop=["STOP"], max_tokens=8)
            return [e async for e in service.stream(req)]

    events = asyncio.run(main())
    streamed = "".join(e.text for e in events)
    assert streamed == events[-1].response.text == "red green "
    assert "STOP" not in streamed and "blue" not in streamed


@pytest.mark.parametrize("continuous", [False, True], ids=["batcher", "continuous"])
def test_client_that_cancels_its_stream_does_not_break_the_batch(continuous):
    engine = FakeEngine(step_s=0.02, continuous=continuous)
    prompts = [f"w{i} a b c d e" for i in range(6)]

    async def main():
        async with InferenceService(engine, max_batch_size=8, max_wait_ms=30) as service:
            others = [asyncio.create_task(service.handle(Request(prompt=p))) for p in prompts]

            async def quitter() -> str:  # reads one delta, then hangs up
                async for event in service.stream(Request(prompt="q1 q2 q3 q4 q5 q6")):
                    return event.text

            async def listener() -> None:  # would read everything, but its task gets cancelled
                async for _ in service.stream(Request(prompt="z1 z2 z3 z4 z5 z6")):
                    pass

            killed = asyncio.create_task(listener())
            first = await quitter()
            await asyncio.sleep(0.03)
            killed.cancel()
            results = await asyncio.gather(*others)
            after = await service.handle(Request(prompt="still serving"))
            with pytest.raises(asyncio.CancelledError):
                await killed
            return first, results, after, service.metrics()

    first, results, after, m = asyncio.run(asyncio.wait_for(main(), 20))
    assert first == "q1"
    assert [r.text for r in results] == prompts  # everyone else got their own full answer
    assert after.text == "still serving"
    assert m["cancelled"] == 2 and m["errors"] == 0


def test_full_queue_rejects_with_overloaded_and_recovers():
    engine = FakeEngine(held=True)

    async def main():
        async with InferenceService(engine, max_batch_size=1, max_wait_ms=0,
                                    max_queue=2) as service:
            tasks = [asyncio.create_task(service.handle(Request(prompt="p0")))]
            await asyncio.sleep(0.1)  # p0 is in the engine (held at the gate)
            tasks += [asyncio.create_task(service.handle(Request(prompt=f"p{i}")))
                      for i in range(1, 6)]
            await asyncio.sleep(0.1)
            engine.gate.set()
            done = await asyncio.gather(*tasks, return_exceptions=True)
            return done, service.metrics()

    done, m = asyncio.run(asyncio.wait_for(main(), 20))
    rejected = [d for d in done if isinstance(d, Overloaded)]
    served = [d.text for d in done if not isinstance(d, Exception)]
    assert len(served) == 3 and len(rejected) == 3  # 1 running + max_queue=2 waiting
    assert "max_queue=2" in str(rejected[0]) and m["rejected"] == 3
    assert sorted(served) == ["p0", "p1", "p2"]


def test_continuous_engine_gets_requests_directly_but_bounded():
    engine = FakeEngine(step_s=0.01, continuous=True)

    async def main():
        async with InferenceService(engine, max_batch_size=4, max_queue=100) as service:
            out = await asyncio.gather(*(service.handle(Request(prompt=f"c{i} x y"))
                                         for i in range(20)))
            return out, service.metrics()

    out, m = asyncio.run(main())
    assert [r.text for r in out] == [f"c{i} x y" for i in range(20)]
    assert set(engine.batch_sizes) == {1}  # one request per engine call: the engine batches
    assert 1 < engine.most_running <= 4  # concurrent, but never above max_batch_size
    assert m["batching"]["mode"] == "continuous"
    assert 1 < m["batching"]["mean_batch_size"] <= 4  # the same key as the batcher's


def test_metrics_and_clean_shutdown():
    engine = FakeEngine()

    async def main():
        service = InferenceService(engine, lru_cache(), max_batch_size=4, max_wait_ms=5)
        await asyncio.gather(*(service.handle(Request(prompt=f"m{i % 3} k")) for i in range(9)))
        m = service.metrics()
        await service.aclose()
        with pytest.raises(BatcherClosed):
            await service.handle(Request(prompt="late"))
        return m

    m = asyncio.run(main())
    assert m["completed"] == 9 and m["cache_hits"] + m["cache_misses"] == 9
    assert m["batching"]["requests"] == m["cache_misses"] - m["coalesced"]
    assert set(m["latency_s"]) == {"mean", "p50", "p90", "p99"}
    assert 0 < m["latency_s"]["p50"] <= m["latency_s"]["p99"]


def test_a_cache_hit_has_one_stamp_so_no_decode_statistics():
    engine = FakeEngine()

    async def main():
        async with InferenceService(engine, lru_cache(), max_wait_ms=0) as service:
            await service.handle(Request(prompt="one two three four", max_tokens=4))
            return await service.handle(Request(prompt="one two three four", max_tokens=4))

    hit = asyncio.run(main())
    assert hit.cache_hit and hit.completion.output_tokens == 4
    assert hit.completion.tpot_s is None and hit.completion.itl_s == []
    assert 0 <= hit.completion.ttft_s == hit.completion.e2e_s


def test_a_late_joiner_of_a_shared_generation_has_a_non_negative_ttft():
    engine = FakeEngine(step_s=0.05)

    async def main():
        async with InferenceService(engine, lru_cache(), max_wait_ms=0) as service:
            words = "a b c d e f g h"
            first = asyncio.ensure_future(service.handle(Request(prompt=words, max_tokens=8)))
            await asyncio.sleep(0.15)   # the first has tokens by now
            late = await service.handle(Request(prompt=words, max_tokens=8))
            return await first, late, service.metrics()

    first, late, m = asyncio.run(main())
    assert m["coalesced"] == 1 and late.text == first.text
    assert late.completion.ttft_s >= 0 and late.completion.start_s > first.completion.start_s
    assert sorted(late.completion.token_times_s) == late.completion.token_times_s


def test_use_cache_false_runs_the_engine_without_sharing_or_storing():
    engine = FakeEngine(step_s=0.01)

    async def main():
        async with InferenceService(engine, lru_cache(), max_wait_ms=0) as service:
            req = lambda: Request(prompt="x y z", max_tokens=3)  # noqa: E731
            await asyncio.gather(*(service.handle(req(), use_cache=False) for _ in range(3)))
            after_bypass = await service.handle(req())
            return after_bypass, service.metrics()

    after_bypass, m = asyncio.run(main())
    assert not after_bypass.cache_hit          # the bypassed runs stored nothing
    assert sum(engine.batch_sizes) == 4 and m["coalesced"] == 0
    assert (m["not_cached"], m["cache_misses"]) == (3, 1)
