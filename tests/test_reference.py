"""The seed's reference service, reproduced: each of its defects shows up when measured."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
from fakes import FakeEngine

from labkit.bench.compare import measure_reference_defects
from labkit.serving.reference import (
    DictCache,
    GenerationRequest,
    OptimizationConfig,
    OptimizedInferenceService,
)

PROMPTS = [f"prompt {i}" for i in range(8)]


def echo(delay_s: float = 0.03) -> FakeEngine:
    """Answers 'echo: <prompt>' with max_tokens tokens (at most 8), ``delay_s`` after a call."""
    return FakeEngine(reply="echo: {prompt}", tokens=8, delay_s=delay_s, step_s=0)


@pytest.fixture(scope="module")
def defects():
    return measure_reference_defects(echo(), n_requests=8, batch_size=4, max_tokens=8,
                                     prompts=PROMPTS)


def test_caller_that_fills_the_batch_gets_another_requests_text(defects):
    # Callers 3 and 7 fill a batch of 4 and get responses[0]: the texts of callers 0 and 4.
    assert defects["wrong_answer_indices"] == [3, 7]


def test_queued_requests_are_generated_twice(defects):
    # 8 requests, 14 generations: 0-2 and 4-6 alone, then again in their batch.
    assert defects["generations"] == 14
    assert defects["duplicate_generations"] == 6
    assert defects["engine_batch_sizes"] == [1, 1, 1, 4, 1, 1, 1, 4]


def test_sync_generate_blocks_the_event_loop(defects):
    # 14 generations of 30 ms each run without yielding: the 10 ms ticker waits for all.
    assert defects["max_loop_stall_ms"] > 8 * 30


def test_per_request_max_tokens_is_ignored(defects):
    assert defects["max_tokens_requested"] == 2
    assert defects["tokens_received"] == 8


def test_response_text_really_is_another_prompts():
    service = OptimizedInferenceService(echo(0.0), OptimizationConfig(batch_size=2))

    async def main():
        return await asyncio.gather(*(service(GenerationRequest(prompt=p)) for p in "ab"))

    first, second = asyncio.run(main())
    assert first.text == "echo: a"
    assert second.text == "echo: a"  # caller "b" is told the answer to "a"


def test_sampled_output_is_cached_and_replayed():
    cache = DictCache()
    service = OptimizedInferenceService(echo(0.0), OptimizationConfig(batch_size=1), cache=cache)
    req = GenerationRequest(prompt="tell me a joke", temperature=0.7)
    first = asyncio.run(service(req))
    again = asyncio.run(service(req))
    assert not first.cache_hit and again.cache_hit and again.text == first.text


def _key_in_subprocess(hash_seed: str) -> str:
    code = ("from labkit.serving.reference import *; "
            "s = OptimizedInferenceService.__new__(OptimizedInferenceService); "
            "print(s._generate_cache_key(GenerationRequest(prompt='What is the capital of "
            "France?')))")
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_keys_differ_across_processes():
    keys = {_key_in_subprocess(seed) for seed in ("1", "2", "3")}
    assert len(keys) == 3, keys  # three workers, three different keys for one request
    assert all(k.startswith("llm:") for k in keys)


def test_dict_cache_expires_entries():
    cache = DictCache()
    cache.setex("k", 0, "v")
    assert cache.get("k") is None
    cache.setex("k", 60, "v")
    assert cache.get("k") == "v"


def test_cache_argument_must_be_a_client():
    with pytest.raises(TypeError, match="Redis client"):
        OptimizedInferenceService(echo(), OptimizationConfig(), cache=42)
