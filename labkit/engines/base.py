"""The one engine interface: requests in, completions with per-token timestamps out.

All clocks are ``time.perf_counter()`` seconds. An engine stamps each output token when its id is
on the host (for a GPU engine that is after a device sync), so TTFT, TPOT and ITL computed from
these stamps are what a client would see, not kernel-launch times.

Bounded work. ``Engine.check(request)`` refuses, before any work, a request whose prompt has no
tokens or whose prompt tokens + ``max_tokens`` exceed the model's context (``max_model_len``):
an ``InvalidRequest``, which the HTTP front answers with a 400. A request that is cancelled
(``request.cancel()``) or passes its ``deadline_s`` is ``aborted``: every engine watches that
flag between decode steps, stops generating the request and returns what it has with
``finish_reason == ABORTED``.
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from labkit.config import DEFAULT_MAX_TOKENS

_ids = itertools.count()
SEED_RANGE = (-2**63, 2**63 - 1)  # a 64-bit seed, as torch and vLLM take it
ABORTED = "abort"  # finish_reason of a generation stopped by cancel() or its deadline (vLLM's name)


class InvalidRequest(ValueError):
    """A request refused before any work, naming the field (``param``) and what is allowed;
    ``code`` is OpenAI's error code where it has one (``context_length_exceeded``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code

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
    # perf_counter() time at which the engine stops generating it (set by InferenceService)
    deadline_s: float | None = field(default=None, compare=False)
    cancelled: bool = field(default=False, compare=False, repr=False)  # set by cancel()

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest("a Request needs exactly one of prompt= or messages=", "prompt")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or \
                self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}",
                                 "max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequest(f"temperature must be in [0, 2], got {self.temperature!r}",
                                 "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if self.seed is not None and not (isinstance(self.seed, int) and
                                          SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise InvalidRequest(f"seed must be an integer in [-2**63, 2**63 - 1], got "
                                 f"{self.seed!r}", "seed")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop and not all(self.stop):
            raise InvalidRequest(f"stop strings must not be empty, got {self.stop!r}", "stop")
        texts = [self.prompt] if self.prompt is not None else \
            [str(m.get("content", "")) for m in self.messages]
        for text in texts + list(self.stop or ()):
            unicode_text(text, "prompt" if self.prompt is not None else "messages")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def cancel(self) -> None:
        """Ask the engine to stop generating this request (its caller has gone)."""
        self.cancelled = True

    @property
    def aborted(self) -> bool:
        """True once cancelled or past ``deadline_s``: engines stop it at the next step."""
        return self.cancelled or (self.deadline_s is not None and now() >= self.deadline_s)

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
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens) or ABORTED
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
    max_model_len: int | None = None  # context (prompt + output tokens); None: not checked
    tokenizer = None  # the model's tokenizer, where the engine has one

    def __init__(self, model: str, device=None, dtype: str = "auto") -> None:
        self.model_name = model
        self.device = device
        self.dtype = dtype

    @abstractmethod
    def generate(self, requests: Sequence[Request],
                 on_token: TokenCallback | None = None) -> list[Completion]:
        """Run ``requests`` together; return one Completion per request, in order."""

    def encode(self, request: Request) -> list[int]:
        """The request's prompt token ids, as ``generate`` will see them."""
        return encode_request(self.tokenizer, request)

    def check(self, request: Request) -> int:
        """Refuse ``request`` before any work (``InvalidRequest``) when its prompt has no tokens
        or prompt + ``max_tokens`` exceed ``max_model_len``; return its prompt tokens."""
        prompt_tokens = len(self.encode(request))
        check_context(request, prompt_tokens, self.max_model_len)
        return prompt_tokens

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


def unicode_text(text: str, param: str) -> str:
    """``text`` if it can be encoded as UTF-8, else ``InvalidRequest``: a lone surrogate such as
    ``"\\ud800"`` (valid JSON, not valid Unicode) would otherwise fail deep in the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start:err.end].encode("unicode_escape").decode()
        raise InvalidRequest(f"'{param}' is not valid Unicode: lone surrogate {bad} at "
                             f"character {err.start}; send UTF-8 text", param) from None
    return text


def check_context(request: Request, prompt_tokens: int, max_model_len: int | None) -> None:
    """``InvalidRequest`` when the prompt is empty or prompt tokens + ``max_tokens`` exceed
    ``max_model_len`` (tokens); the message names both numbers and the limit."""
    param = "prompt" if request.prompt is not None else "messages"
    if prompt_tokens == 0:
        raise InvalidRequest(f"request {request.request_id!r}: the prompt is empty (0 tokens); "
                             "send at least one token of text", param)
    if max_model_len is not None and prompt_tokens + request.max_tokens > max_model_len:
        raise InvalidRequest(
            f"request {request.request_id!r}: {prompt_tokens} prompt tokens + max_tokens "
            f"{request.max_tokens} exceed max_model_len {max_model_len}, the model's maximum "
            f"context length; shorten the prompt or lower max_tokens", param,
            "context_length_exceeded")


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
