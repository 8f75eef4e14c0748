"""The one engine interface: requests in, completions with per-token timestamps out.

All clocks are ``time.perf_counter()`` seconds. An engine stamps each output token when its id is
on the host (for a GPU engine that is after a device sync), so TTFT, TPOT and ITL computed from
these stamps are what a client would see, not kernel-launch times.
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from labkit.config import DEFAULT_MAX_TOKENS

_ids = itertools.count()

# on_token(request_index, token_id, text_delta, t_s): called once per output token, on the
# engine's thread, as soon as the token exists. Streaming is built on it.
TokenCallback = Callable[[int, int, str, float], None]


@dataclass
class Request:
    """One generation request: a raw ``prompt`` or chat ``messages``, and sampling params.

    ``temperature == 0`` means greedy decoding (then ``top_p`` and ``seed`` do not matter).
    """

    prompt: str | None = None
    messages: list[dict] | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    ignore_eos: bool = False  # benchmarks: always produce max_tokens tokens
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a Request needs exactly one of prompt= or messages=")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def sampling_key(self) -> tuple:
        """Requests with the same key can share one batched decode call."""
        if self.greedy:
            return ("greedy",)
        return ("sample", self.temperature, self.top_p, self.seed)


class TokenTimings:
    """TTFT, TPOT, ITL and E2E (seconds) of anything with ``start_s``, ``token_times_s`` and
    ``end_s``: an engine's Completion or the HTTP client's ``HTTPCompletion``."""

    start_s: float
    token_times_s: list[float]
    end_s: float

    def _tokens_after_first(self) -> int:
        """Output tokens after the first one, the TPOT denominator."""
        return len(self.token_times_s) - 1

    @property
    def ttft_s(self) -> float | None:
        """Time to first token (s): first token stamp minus request start; None if no token."""
        return self.token_times_s[0] - self.start_s if self.token_times_s else None

    @property
    def e2e_s(self) -> float:
        """End-to-end latency (s): completion ready minus request start."""
        return self.end_s - self.start_s

    @property
    def itl_s(self) -> list[float]:
        """Inter-token latencies (s): gaps between consecutive output tokens."""
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (s): (last - first token time) / (tokens - 1),
        as in ``labkit.metrics``; None if < 2 tokens."""
        after_first = self._tokens_after_first()
        if len(self.token_times_s) < 2 or after_first < 1:
            return None
        return (self.token_times_s[-1] - self.token_times_s[0]) / after_first


@dataclass
class Completion(TokenTimings):
    """What an engine produced for one request, with a timestamp for every output token."""

    request_id: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens reached)
    start_s: float  # when the request was handed to the engine
    token_times_s: list[float]  # perf_counter() when each output token was on the host
    end_s: float = 0.0  # when the completion was ready (>= the last token time)

    @property
    def output_tokens(self) -> int:
        return len(self.token_ids)


class Engine(ABC):
    """Generates completions for a batch of requests. Subclasses: hf, hf-cb, vllm."""

    name: str = "base"
    continuous: bool = False  # True: requests of different lengths leave the batch as they end

    def __init__(self, model: str, device=None, dtype: str = "auto") -> None:
        self.model_name = model
        self.device = device
        self.dtype = dtype

    @abstractmethod
    def generate(self, requests: Sequence[Request],
                 on_token: TokenCallback | None = None) -> list[Completion]:
        """Run ``requests`` together; return one Completion per request, in order."""

    def warmup(self) -> None:
        """One tiny generation, so later timings exclude lazy init and compilation."""
        self.generate([Request(prompt="Hello", max_tokens=4)])

    def close(self) -> None:  # noqa: B027 (engines without resources need no close)
        """Free the model's memory."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def now() -> float:
    """The clock every timestamp in labkit uses (s)."""
    return time.perf_counter()


def truncate_at_stop(text: str, stop: Sequence[str] | None) -> tuple[str, bool]:
    """Cut ``text`` before the first stop string; return (text, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stop or ()) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def encode_request(tokenizer, request: Request) -> list[int]:
    """Prompt token ids: the chat template for ``messages``, the plain text for ``prompt``.

    Every engine tokenizes here, so the same request is the same tokens in hf, hf-cb and vllm.
    """
    if request.messages is not None:
        ids = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        return list(ids)
    return tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
