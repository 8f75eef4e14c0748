"""Engines: batched greedy equals unbatched, timestamps are sane, bad names fail clearly."""

from __future__ import annotations

import pytest

from labkit.engines import Request, get_engine, resolve_engine
from labkit.engines.base import encode_request
from labkit.equivalence import assert_same_or_near_tie
from labkit.models import ModelNotFoundError

PROMPTS = [
    "What is the capital of France?",
    "Hi",
    "Write two sentences about the history of the printing press and why it mattered so much "
    "for the spread of ideas in Europe.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
]


def chat(prompt: str, max_tokens: int = 16, **kw) -> Request:
    return Request(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, **kw)


@pytest.fixture(scope="module")
def unbatched(hf_engine):
    """Each prompt's greedy output, generated alone (no padding): the reference."""
    return [hf_engine.generate([chat(p)])[0] for p in PROMPTS]


def _check_batch_matches(engine, reference_engine, unbatched):
    reqs = [chat(p) for p in PROMPTS]
    batched = engine.generate(reqs)
    assert [c.request_id for c in batched] == [r.request_id for r in reqs]
    eos = reference_engine.tokenizer.eos_token_id
    for req, ref, got in zip(reqs, unbatched, batched):
        prompt_ids = encode_request(reference_engine.tokenizer, req)
        assert_same_or_near_tie(reference_engine.model, prompt_ids, ref.token_ids,
                                got.token_ids, eos, label=req.messages[0]["content"][:30])


def test_hf_batched_greedy_equals_unbatched(hf_engine, unbatched):
    _check_batch_matches(hf_engine, hf_engine, unbatched)


def test_hf_cb_batched_greedy_equals_unbatched(hfcb_engine, hf_engine, unbatched):
    _check_batch_matches(hfcb_engine, hf_engine, unbatched)


def test_bundled_model_answers_paris(hf_engine):
    [c] = hf_engine.generate([chat("What is the capital of France?", max_tokens=24)])
    assert "Paris" in c.text
    assert c.finish_reason == "stop"


@pytest.mark.slow  # the engine comes from getfixturevalue, which the conftest hook cannot see
@pytest.mark.parametrize("engine_fixture", ["hf_engine", "hfcb_engine"])
def test_token_timestamps_increase_after_start(engine_fixture, request):
    engine = request.getfixturevalue(engine_fixture)
    reqs = [chat(p, max_tokens=8, ignore_eos=True) for p in PROMPTS[:3]]
    for c in engine.generate(reqs):
        assert len(c.token_times_s) == c.output_tokens == 8
        assert c.token_times_s[0] > c.start_s
        assert all(b >= a for a, b in zip(c.token_times_s, c.token_times_s[1:]))
        assert c.token_times_s[-1] > c.token_times_s[0]
        assert c.end_s >= c.token_times_s[-1]
        assert 0 < c.ttft_s <= c.e2e_s


def test_streaming_callback_sees_every_token_in_order(hf_engine):
    seen: list[tuple[int, int, str]] = []
    reqs = [chat("Name three colors."), chat("Hi")]
    out = hf_engine.generate(reqs, on_token=lambda i, tok, delta, t: seen.append((i, tok, delta)))
    for i, c in enumerate(out):
        mine = [(tok, delta) for j, tok, delta in seen if j == i]
        assert [tok for tok, _ in mine] == c.token_ids
        assert "".join(d for _, d in mine).strip() == c.text.strip()


def test_per_request_max_tokens_and_stop_in_one_batch(hf_engine):
    reqs = [chat("Count from one to twenty in words.", max_tokens=5, ignore_eos=True),
            chat("Count from one to twenty in words.", max_tokens=30, stop=["five"])]
    short, stopped = hf_engine.generate(reqs)
    assert short.output_tokens == 5 and short.finish_reason == "length"
    assert "five" not in stopped.text and stopped.finish_reason == "stop"


def test_sampled_requests_follow_their_seed(hf_engine):
    def req(seed: int) -> Request:
        return Request(prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=seed,
                       ignore_eos=True)

    a, b, other = (hf_engine.generate([req(seed)])[0] for seed in (7, 7, 8))
    assert a.token_ids == b.token_ids
    assert a.token_ids != other.token_ids  # 12 tokens sampled at T=1: another seed, another text


def test_unknown_engine_name_lists_choices():
    with pytest.raises(ValueError, match=r"unknown engine 'vlm'; choose one of: hf, hf-cb, vllm"):
        get_engine("vlm")


def test_unknown_model_name_lists_choices():
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'smollm3'.*smollm2-135m"):
        get_engine("hf", model="smollm3")


@pytest.mark.parametrize("cuda, vllm, expected", [(False, False, "hf"), (False, True, "hf"),
                                                   (True, False, "hf"), (True, True, "vllm")])
def test_auto_engine_is_vllm_only_on_a_gpu_with_vllm_installed(monkeypatch, cuda, vllm, expected):
    from labkit import device
    from labkit.engines import registry

    monkeypatch.setattr(device, "has_cuda", lambda: cuda)
    monkeypatch.setattr(registry, "vllm_available", lambda: vllm)
    assert resolve_engine("auto") == expected


def test_vllm_absent_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_vllm(name, *args, **kw):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(ImportError, match=r"labkit\[gpu\]"):
        get_engine("vllm")


@pytest.mark.parametrize("bad, message", [
    (dict(prompt="x", max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(prompt="x", temperature=-1.0), "temperature must be in"),
    (dict(prompt="x", messages=[{"role": "user", "content": "y"}]), "exactly one of"),
])
def test_bad_request_is_rejected_with_reason(bad, message):
    with pytest.raises(ValueError, match=message):
        Request(**bad)


def test_static_cache_loop_matches_generate(hf_engine):
    """labkit's lean decode loop (static KV cache) gives generate's greedy tokens."""
    from labkit.engines.hf import HFEngine

    fast = HFEngine("smollm2-135m", static_cache=True)
    reqs = [chat(p, max_tokens=12) for p in PROMPTS[:3]]
    for ref, got in zip(hf_engine.generate(reqs), fast.generate(reqs)):
        assert got.token_ids == ref.token_ids and got.finish_reason == ref.finish_reason
    fast.close()


@pytest.mark.slow  # the model loads before the arguments are checked
def test_compile_without_static_cache_is_refused():
    from labkit.engines.hf import HFEngine

    with pytest.raises(ValueError, match="compile=True needs static_cache=True"):
        HFEngine("smollm2-135m", compile=True)


# --- bounded work: the context, cancellation and deadlines ----------------------------------
def test_prompt_beyond_the_context_is_refused_before_any_work(hf_engine):
    """~8,150 prompt tokens + max_tokens 200 do not fit 8,192: a 400-style error naming all
    three numbers, from check() and from generate() alike, instead of 200 tokens of garbage."""
    from labkit.engines.base import InvalidRequest

    req = Request(prompt="hello " * 8150, max_tokens=200)
    message = r"\d{4} prompt tokens \+ max_tokens 200 exceed max_model_len 8192"
    with pytest.raises(InvalidRequest, match=message) as err:
        hf_engine.check(req)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequest, match=message):
        hf_engine.generate([req])


@pytest.mark.slow  # the engine comes from getfixturevalue, which the conftest hook cannot see
@pytest.mark.parametrize("engine_fixture", ["hf_engine", "hfcb_engine"])
def test_a_cancelled_generation_stops_at_the_next_step(engine_fixture, request):
    import threading
    import time

    from labkit.engines.base import ABORTED

    engine = request.getfixturevalue(engine_fixture)
    req = chat("Count from one to one thousand.", max_tokens=300, ignore_eos=True)
    threading.Timer(0.5, req.cancel).start()
    t0 = time.perf_counter()
    [done] = engine.generate([req])
    assert done.finish_reason == ABORTED and done.output_tokens < 300
    assert time.perf_counter() - t0 < 3.0  # 300 tokens take ~10 s on 2 CPU cores


def test_past_its_deadline_one_row_stops_and_its_batch_mate_finishes(hf_engine):
    from labkit.engines.base import ABORTED, now

    late = chat("Count from one to one thousand.", max_tokens=300, ignore_eos=True)
    late.deadline_s = now() + 0.5
    other = chat("Count from one to one thousand.", max_tokens=12, ignore_eos=True)
    stopped, finished = hf_engine.generate([late, other])
    assert stopped.finish_reason == ABORTED and stopped.output_tokens < 300
    assert finished.finish_reason == "length" and finished.output_tokens == 12
