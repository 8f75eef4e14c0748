"""The vLLM engine's step loop, driven against a fake ``LLMEngine`` (no GPU, no vLLM needed):
a request vLLM refuses fails its own caller and the loop goes on serving the others; a request
longer than ``max_model_len`` is refused up front with the numbers in the message; a cancelled
request is aborted in vLLM at the next step."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

from labkit.engines import Request
from labkit.engines.vllm import VLLMEngine


class FakeLLMEngine:
    """One token per step per request; refuses prompts of more than ``limit`` tokens."""

    def __init__(self, limit: int) -> None:
        self.limit, self.live, self.aborted = limit, {}, []

    def abort_request(self, rids):
        for rid in rids:
            self.live.pop(rid)
            self.aborted.append(rid)

    def add_request(self, rid, prompt, params):
        if len(prompt["prompt_token_ids"]) > self.limit:
            raise ValueError(f"prompt of {len(prompt['prompt_token_ids'])} tokens is too long")
        self.live[rid] = (params.max_tokens, [])

    def step(self):
        outs = []
        for rid, (want, got) in list(self.live.items()):
            got.append(7)
            done = len(got) == want
            seq = SimpleNamespace(token_ids=list(got), text="a" * len(got),
                                  finish_reason="length" if done else None)
            outs.append(SimpleNamespace(request_id=rid, finished=done, outputs=[seq]))
            if done:
                del self.live[rid]
        return outs


@pytest.fixture
def engine(monkeypatch):
    fake = types.ModuleType("vllm")
    fake.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    fake.inputs = types.ModuleType("vllm.inputs")
    fake.inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", fake.inputs)
    eng = VLLMEngine.__new__(VLLMEngine)  # everything but loading vLLM
    eng.tokenizer = SimpleNamespace(eos_token_id=0)
    eng._start(FakeLLMEngine(limit=20), max_model_len=64, eos_ids={0})
    yield eng
    eng._closed.set()
    eng._thread.join(timeout=5)


def test_a_refused_request_fails_its_caller_and_the_loop_goes_on(engine, monkeypatch):
    monkeypatch.setattr("labkit.engines.vllm.encode_request",
                        lambda tok, r: [1] * len(r.prompt.split()))
    with pytest.raises(RuntimeError, match="vLLM failed on long: prompt of 30 tokens is too long"):
        engine.generate([Request(prompt="w " * 30, max_tokens=3, request_id="long")])
    assert engine._thread.is_alive()
    [done] = engine.generate([Request(prompt="two words", max_tokens=3, request_id="ok")])
    assert done.token_ids == [7, 7, 7] and done.finish_reason == "length"


def test_prompt_plus_max_tokens_over_max_model_len_is_refused_up_front(engine, monkeypatch):
    monkeypatch.setattr("labkit.engines.vllm.encode_request",
                        lambda tok, r: [1] * len(r.prompt.split()))
    with pytest.raises(ValueError, match=r"'big': 60 prompt tokens \+ max_tokens 8 exceed "
                                         r"max_model_len 64"):
        engine.generate([Request(prompt="w " * 60, max_tokens=8, request_id="big")])


def test_a_cancelled_request_is_aborted_in_vllm_and_the_loop_goes_on(engine, monkeypatch):
    import threading

    from labkit.engines.base import ABORTED

    monkeypatch.setattr("labkit.engines.vllm.encode_request",
                        lambda tok, r: [1] * len(r.prompt.split()))
    endless = Request(prompt="go on", max_tokens=60, request_id="endless")
    threading.Timer(0.05, endless.cancel).start()
    engine.llm.step = _slow(engine.llm.step)
    [stopped] = engine.generate([endless])
    assert stopped.finish_reason == ABORTED and stopped.output_tokens < 60
    assert [rid.split("#")[0] for rid in engine.llm.aborted] == ["endless"]
    [done] = engine.generate([Request(prompt="two words", max_tokens=3)])
    assert done.finish_reason == "length"


def _slow(step):
    """``step`` that takes 10 ms, like a real decode step (60 steps: 0.6 s)."""
    import time

    def slow():
        time.sleep(0.01)
        return step()
    return slow
