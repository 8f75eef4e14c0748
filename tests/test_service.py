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
from labkit.serving.gate import ContinuousGate
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


# --- one request path, a pluggable batcher ------------------------------------------------------
class KeyCountingCache(AsyncResponseCache):
    """The LRU cache, counting ``key`` calls: the service must compute each request's key once."""

    key_calls = 0

    def key(self, request):
        self.key_calls += 1
        return super().key(request)


def test_the_key_is_computed_once_per_request():
    engine = FakeEngine(step_s=0.02)
    cache = KeyCountingCache("smollm2-135m", "lru")

    async def main():
        async with InferenceService(engine, cache, max_wait_ms=0) as service:
            same = lambda: Request(prompt="one key each", max_tokens=3)  # noqa: E731
            await asyncio.gather(*(service.handle(same()) for _ in range(3)))  # miss + 2 joined
            hit = await service.handle(same())
            await service.handle(Request(prompt="sampled words", temperature=0.9, seed=1))
            await service.handle(same(), use_cache=False)  # no cache: no key at all
            return hit, service.metrics()

    hit, m = asyncio.run(main())
    assert hit.cache_hit and (m["coalesced"], m["not_cached"]) == (2, 2)
    assert cache.key_calls == 5  # 6 requests, one without the cache
    assert cache.counters.skipped == 1  # the sampled request: its key is None
    assert sum(engine.batch_sizes) == 3  # the shared miss, the sampled one, the bypass


@pytest.mark.parametrize("continuous, mode", [(False, "dynamic"), (True, "continuous")])
def test_one_handle_serves_static_and_continuous_engines(continuous, mode):
    engine = FakeEngine(step_s=0.01, continuous=continuous)
    prompts = [f"p{i} x y" for i in range(6)]

    async def main():
        async with InferenceService(engine, lru_cache(), max_batch_size=4) as service:
            first = await asyncio.gather(*(service.handle(Request(prompt=p)) for p in prompts))
            again = await asyncio.gather(*(service.handle(Request(prompt=p)) for p in prompts))
            return first, again, service.metrics()

    first, again, m = asyncio.run(main())
    assert [r.text for r in first] == [r.text for r in again] == prompts
    assert not any(r.cache_hit for r in first) and all(r.cache_hit for r in again)
    assert m["batching"]["mode"] == mode and m["batching"]["requests"] == 6
    assert sum(engine.batch_sizes) == 6 and engine.most_running <= 4
    # a continuous engine gets single requests and batches them itself; a static one, batches
    assert (set(engine.batch_sizes) == {1}) if continuous else max(engine.batch_sizes) > 1


def test_batching_off_is_one_request_per_call_even_for_a_continuous_engine():
    engine = FakeEngine(continuous=True)

    async def main():
        async with InferenceService(engine, batching=False) as service:
            await asyncio.gather(*(service.handle(Request(prompt=f"b{i}")) for i in range(4)))
            return service.metrics()["batching"]

    batching = asyncio.run(main())
    assert (batching["mode"], batching["max_batch_size"]) == ("dynamic", 1)
    assert engine.batch_sizes == [1, 1, 1, 1] and engine.most_running == 1


def test_continuous_gate_bounds_the_queue_and_rejects_beyond_it():
    engine = FakeEngine(held=True, continuous=True)

    async def main():
        async with ContinuousGate(engine, max_batch_size=2, max_queue=3) as gate:
            tasks = [asyncio.create_task(gate.submit(Request(prompt=f"g{i}"))) for i in range(5)]
            await asyncio.sleep(0.1)  # 2 in the engine (held at its gate), 3 waiting
            counters = gate.counters()
            with pytest.raises(Overloaded, match="max_queue=3"):
                await gate.submit(Request(prompt="one too many"))
            engine.gate.set()
            done = await asyncio.gather(*tasks)
            return counters, done, gate.counters()

    counters, done, after = asyncio.run(asyncio.wait_for(main(), 20))
    assert (counters["in_flight"], counters["queue_depth"]) == (2, 3)
    assert [c.text for c in done] == [f"g{i}" for i in range(5)]
    assert (after["in_flight"], after["queue_depth"], after["requests"]) == (0, 0, 5)
    assert engine.most_running == 2


def test_a_cancelled_caller_frees_its_gate_slot_only_when_the_engine_finishes():
    engine = FakeEngine(held=True, continuous=True)

    async def main():
        async with ContinuousGate(engine, max_batch_size=1) as gate:
            leaver = asyncio.create_task(gate.submit(Request(prompt="leaves early")))
            await asyncio.sleep(0.05)  # in the engine, held
            waiter = asyncio.create_task(gate.submit(Request(prompt="waits its turn")))
            await asyncio.sleep(0.05)
            leaver.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leaver
            await asyncio.sleep(0.1)
            # The engine still runs the leaver's request: its slot is not free yet.
            held = (waiter.done(), gate.counters()["in_flight"], gate.queue_depth)
            engine.gate.set()
            return held, await waiter

    held, completion = asyncio.run(asyncio.wait_for(main(), 20))
    assert held == (False, 1, 1)
    assert completion.text == "waits its turn" and engine.most_running == 1


def test_the_replica_service_runs_the_same_path_with_serve_batch(monkeypatch):
    """``ServeBatcher`` behind the same ``InferenceService``: batches formed by ``@serve.batch``
    (outside a replica here: only the replica config it reads is stubbed), tokens streamed,
    repeats served from the cache, metrics under the same keys."""
    serve = pytest.importorskip("ray.serve")
    from types import SimpleNamespace

    from labkit.serving.serve_batcher import ServeBatcher

    config = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: config)
    engine = FakeEngine(step_s=0.01)
    prompts = [f"s{i} a b" for i in range(12)]

    async def main():
        async with InferenceService(engine, lru_cache(),
                                    batcher=ServeBatcher(engine, 8, 20.0)) as service:
            out = await asyncio.gather(*(service.handle(Request(prompt=p)) for p in prompts))
            events = [e async for e in service.stream(Request(prompt="x y z"))]
            again = await service.handle(Request(prompt=prompts[0]))
            return out, events, again, service.metrics()

    out, events, again, m = asyncio.run(asyncio.wait_for(main(), 30))
    assert [r.text for r in out] == prompts and again.cache_hit
    assert [e.text for e in events] == ["x", " y", " z", ""]
    assert m["batching"]["mode"] == "serve.batch" and max(engine.batch_sizes) <= 8
    assert m["batching"]["requests"] == 13 and m["batching"]["mean_batch_size"] > 1
    assert m["cache_hits"] == 1 and m["queue_depth"] == 0
