"""``CountingEngine``: an engine wrapper that counts what it is asked to generate.

The serving labs use it to show duplicate work (the seed's service re-runs queued requests) and
to attribute a service's gain to fewer engine calls, cache hits or batching.
"""

from __future__ import annotations

from labkit.engines.base import Engine, Request


class CountingEngine(Engine):
    """Wraps an engine; counts requests generated, per prompt how often and how many tokens each
    generation produced (``generations``, ``output_tokens``), and the size of every call
    (``batch_sizes``). ``reset()`` zeroes the counts."""

    def __init__(self, inner: Engine) -> None:
        super().__init__(inner.model_name, inner.device, inner.dtype)
        self.inner, self.name, self.continuous = inner, inner.name, inner.continuous
        self.tokenizer, self.max_model_len = inner.tokenizer, inner.max_model_len
        self.reset()

    def encode(self, request: Request) -> list[int]:
        """The inner engine's prompt token ids."""
        return self.inner.encode(request)

    def reset(self) -> None:
        """Forget every count."""
        self.generations: dict[str, int] = {}
        self.output_tokens: dict[str, list[int]] = {}
        self.batch_sizes: list[int] = []

    @property
    def requests(self) -> int:
        """Requests generated since the last ``reset`` (duplicates counted)."""
        return sum(self.batch_sizes)

    def generate(self, requests, on_token=None):
        out = self.inner.generate(requests, on_token)
        self.batch_sizes.append(len(requests))
        for req, completion in zip(requests, out):
            key = req.prompt if req.prompt is not None else str(req.messages)
            self.generations[key] = self.generations.get(key, 0) + 1
            self.output_tokens.setdefault(key, []).append(completion.output_tokens)
        return out
