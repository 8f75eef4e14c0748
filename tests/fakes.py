"""The one fake engine of the tests: a model-free ``Engine`` with known timing and output.

``FakeEngine`` "decodes" a reply built from each request's prompt, one step per token for the
whole batch (like a static batch), calling ``on_token`` like a real engine. Its knobs:

| knob              | default        | what it does                                            |
|-------------------|----------------|---------------------------------------------------------|
| ``reply``         | ``"{prompt}"`` | the answer; ``{prompt}``: the prompt or the last chat   |
|                   |                | message; cut at the request's ``stop`` strings          |
| ``tokens``        | ``None``       | ``None``: one token per word of the reply (streams word |
|                   |                | by word); ``n``: ``n`` tokens, the reply in the first;  |
|                   |                | never more than the request's ``max_tokens``            |
| ``delay_s``       | ``0.0``        | seconds slept once per call, before the first step      |
| ``step_s``        | ``0.01``       | seconds slept before each decode step (all sequences)   |
| ``held``          | ``False``      | ``gate`` starts closed: calls wait for ``gate.set()``   |
| ``continuous``    | ``False``      | the ``Engine.continuous`` flag the service reads        |
| ``oom_at``        | ``None``       | a call of this many requests or more raises CUDA OOM    |
| ``tokenizer``     | ``None``       | a real tokenizer, for code that counts prompt tokens    |
|                   |                | (without one: one prompt token per word)                |
| ``max_model_len`` | ``None``       | ``Engine.max_model_len``: prompt + max_tokens limit     |
| ``model``         | ``"fake"``     | ``Engine.model_name``                                   |

Like a real engine it stops a request that is cancelled or past its deadline
(``Request.aborted``) at the next step, with ``finish_reason == "abort"``. What it records:
``batch_sizes`` (requests per call, in call order), ``received`` (every request, in arrival
order), ``running`` / ``most_running`` (requests inside ``generate`` now / at most at once),
``aborted`` (ids of the requests it stopped early).
"""

from __future__ import annotations

import threading
import time

import torch

from labkit.engines.base import ABORTED, Completion, Engine, Request, now, truncate_at_stop


class FakeEngine(Engine):
    """A model-free engine; see the module docstring for its knobs and records."""

    name = "fake"

    def __init__(self, *, reply: str = "{prompt}", tokens: int | None = None,
                 delay_s: float = 0.0, step_s: float = 0.01, held: bool = False,
                 continuous: bool = False, oom_at: int | None = None, tokenizer=None,
                 max_model_len: int | None = None, model: str = "fake") -> None:
        super().__init__(model)
        self.reply, self.tokens, self.delay_s, self.step_s = reply, tokens, delay_s, step_s
        self.continuous, self.oom_at, self.tokenizer = continuous, oom_at, tokenizer
        self.max_model_len = max_model_len
        self.aborted: list[str] = []
        self.gate = threading.Event()
        if not held:
            self.gate.set()
        self.batch_sizes: list[int] = []
        self.received: list[Request] = []
        self.running = self.most_running = 0
        self._lock = threading.Lock()

    @staticmethod
    def prompt(request: Request) -> str:
        """The request's prompt, or the content of its last chat message."""
        return request.prompt if request.prompt is not None else request.messages[-1]["content"]

    def encode(self, request: Request) -> list[int]:
        """The tokenizer's ids when there is one, else one id per prompt word."""
        if self.tokenizer is not None:
            return super().encode(request)
        return list(range(len(self.prompt(request).split())))

    def pieces(self, request: Request) -> list[str]:
        """The text delta of each output token of ``request`` (their join is the reply)."""
        text = self.reply.format(prompt=self.prompt(request))
        if self.tokens is None:
            words = text.split()[:request.max_tokens]
            return [(" " if i else "") + w for i, w in enumerate(words)]
        return [text] + [""] * (min(self.tokens, request.max_tokens) - 1)

    def generate(self, requests, on_token=None):
        """Wait at the gate, sleep ``delay_s``, then one step of ``step_s`` per token."""
        if self.oom_at is not None and len(requests) >= self.oom_at:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory (fake: a batch of {len(requests)} >= oom_at={self.oom_at})")
        start = now()
        with self._lock:
            self.batch_sizes.append(len(requests))
            self.received += requests
            self.running += len(requests)
            self.most_running = max(self.most_running, self.running)
        try:
            self.gate.wait()
            time.sleep(self.delay_s)
            pieces = [self.pieces(r) for r in requests]
            times = self._decode(requests, pieces, on_token)
        finally:
            with self._lock:
                self.running -= len(requests)
        out = []
        for r, p, ts in zip(requests, pieces, times):
            stopped = len(ts) < len(p)  # aborted before its last token
            text, hit = truncate_at_stop("".join(p[:len(ts)]), r.stop)
            reason = "stop" if hit else ABORTED if stopped else "length"
            out.append(Completion(r.request_id, text, list(range(len(ts))),
                                  len(self.prompt(r).split()), reason, start, ts, now()))
        return out

    def _decode(self, requests: list[Request], pieces: list[list[str]],
                on_token) -> list[list[float]]:
        """One token of every unfinished sequence each ``step_s`` seconds, ``on_token`` called
        per token (index, step, delta, time); a request that is ``aborted`` gets no more tokens.
        Returns each sequence's token times (s)."""
        times: list[list[float]] = [[] for _ in pieces]
        live = set(range(len(pieces)))
        for step in range(max(map(len, pieces), default=0)):
            time.sleep(self.step_s)
            t = now()
            for i, p in enumerate(pieces):
                if i in live and step < len(p) and requests[i].aborted:
                    live.discard(i)
                    with self._lock:
                        self.aborted.append(requests[i].request_id)
                if i in live and step < len(p):
                    times[i].append(t)
                    if on_token is not None:
                        on_token(i, step, p[step], t)
            if not live & {i for i, p in enumerate(pieces) if step + 1 < len(p)}:
                break
        return times
