"""``ProcessEngine``: an engine in its own process answers as it would in this one (text,
streamed tokens, errors), stops a cancelled request, and a dead child fails its callers at once
instead of hanging them."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from fastapi.testclient import TestClient

from labkit.engines import ProcessEngine, Request, engine_device
from labkit.engines.base import InvalidRequest
from labkit.engines.process import EngineProcessError

MODEL = "smollm2-135m"


def test_a_childs_error_is_raised_again_as_its_kind():
    import torch

    from labkit.engines.process import _portable, _rebuilt

    refused = _rebuilt(*_portable(InvalidRequest("too long", "prompt", "context_length_exceeded")))
    assert isinstance(refused, InvalidRequest)
    assert (str(refused), refused.param, refused.code) == ("too long", "prompt",
                                                           "context_length_exceeded")
    oom = _rebuilt(*_portable(torch.cuda.OutOfMemoryError("CUDA out of memory")))
    assert isinstance(oom, torch.cuda.OutOfMemoryError)
    other = _rebuilt(*_portable(KeyError("x")))
    assert type(other) is RuntimeError and "KeyError in the engine's process" in str(other)


@pytest.fixture(scope="module")
def engine():
    eng = ProcessEngine("hf", MODEL)
    yield eng
    eng.close()


@pytest.mark.slow  # starts an engine process (a model load)
def test_it_answers_as_the_engine_in_this_process_does(engine, hf_engine):
    requests = [Request(prompt="Count: one, two,", max_tokens=10),
                Request(messages=[{"role": "user", "content": "Name a colour."}], max_tokens=6)]
    seen: list[tuple] = []
    here = hf_engine.generate(requests)
    there = engine.generate(requests, lambda *event: seen.append(event))
    assert [c.text for c in there] == [c.text for c in here]
    assert [c.token_ids for c in there] == [c.token_ids for c in here]
    assert engine.name == "hf" and not engine.continuous and engine_device(engine) == "cpu"
    assert engine.pid != os.getpid() and engine.max_model_len == hf_engine.max_model_len
    # every token reached on_token, with the child's timestamps (one clock for all processes)
    for i, completion in enumerate(there):
        mine = [e for e in seen if e[0] == i]
        assert [e[1] for e in mine] == completion.token_ids
        assert "".join(e[2] for e in mine) == completion.text
        assert [e[3] for e in mine] == completion.token_times_s
        assert completion.start_s <= completion.token_times_s[0] <= time.perf_counter()


@pytest.mark.slow  # starts an engine process (a model load)
def test_a_cancelled_request_stops_in_the_child(engine):
    request = Request(prompt="Count to a thousand:", max_tokens=4000, ignore_eos=True)
    done: list = []
    worker = threading.Thread(target=lambda: done.append(engine.generate([request])))
    worker.start()
    time.sleep(1.0)
    t0 = time.perf_counter()
    request.cancel()
    worker.join(30)
    [completion] = done[0]
    assert completion.finish_reason == "abort" and completion.output_tokens < 4000
    assert time.perf_counter() - t0 < 5


@pytest.mark.slow  # starts an engine process (a model load)
def test_the_childs_errors_reach_the_caller_with_their_type(engine):
    too_long = Request(prompt="word " * 10, max_tokens=10**6)
    with pytest.raises(InvalidRequest, match="max_model_len"):
        engine.generate([too_long])
    assert engine.generate([Request(prompt="Hi", max_tokens=2)])[0].output_tokens == 2  # still up


@pytest.mark.slow  # starts an engine process (a model load)
def test_served_over_http_with_the_engine_in_its_own_process(engine):
    from labkit.serving.build import build_service
    from labkit.serving.http import create_app

    service = build_service(engine, MODEL, cache=False, warmup=False)
    with TestClient(create_app(service)) as client:
        r = client.post("/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 8, "stream": True,
            "messages": [{"role": "user", "content": "Say hello."}]})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    assert r.text.count("data: {") >= 3  # role, some text, the finish


@pytest.mark.slow  # starts an engine process (a model load)
def test_a_dead_child_fails_its_callers_at_once():
    eng = ProcessEngine("hf", MODEL)
    try:
        request = Request(prompt="Count to a thousand:", max_tokens=4000, ignore_eos=True)
        failed: list[BaseException] = []

        def call() -> None:
            try:
                eng.generate([request])
            except BaseException as err:  # noqa: BLE001 (the test looks at it)
                failed.append(err)

        worker = threading.Thread(target=call)
        worker.start()
        time.sleep(1.0)
        os.kill(eng.pid, signal.SIGKILL)
        worker.join(10)
        assert not worker.is_alive()
        assert isinstance(failed[0], EngineProcessError) and "exited" in str(failed[0])
        with pytest.raises(EngineProcessError, match="process is gone"):
            eng.generate([Request(prompt="Hi", max_tokens=2)])
    finally:
        eng.close()


@pytest.mark.slow  # starts an engine process (a model load)
def test_an_engine_that_cannot_start_is_one_clear_error():
    with pytest.raises(EngineProcessError, match="failed to start in its process: .*nosuch"):
        ProcessEngine("hf", MODEL, dtype="nosuch")


def test_env_is_added_to_the_childs_environment(monkeypatch):
    """What ``env`` names is in the child's environment from its start (vLLM reads
    ``VLLM_BATCH_INVARIANT`` when it is imported), on top of this process's own."""
    from labkit.engines import process

    seen: dict = {}

    class Started(Exception):
        pass

    def popen(args, **kwargs):
        seen.update(kwargs)
        raise Started

    monkeypatch.setattr(process.subprocess, "Popen", popen)
    with pytest.raises(Started):
        ProcessEngine("hf", MODEL, env={"VLLM_BATCH_INVARIANT": "1"})
    assert seen["env"]["VLLM_BATCH_INVARIANT"] == "1"
    assert seen["env"]["PATH"] == os.environ["PATH"]
    with pytest.raises(Started):
        ProcessEngine("hf", MODEL)
    assert seen["env"] is None  # no env: the child inherits this process's as it is
