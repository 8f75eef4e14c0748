"""What ``InferenceService`` gives its callers: a ``ServiceResponse`` per request, and for a
stream, ``StreamEvent`` pieces of text (``safe_prefix`` holds back a tail that may still become
a stop string).
"""

from __future__ import annotations

from dataclasses import dataclass

from labkit.engines.base import Completion, truncate_at_stop


@dataclass
class ServiceResponse:
    """What a caller gets back. ``completion`` carries the per-token timestamps.

    ``completion.start_s`` is when the service received the request, so ``completion.ttft_s``
    and ``completion.e2e_s`` are what this caller saw (queueing included). A cache hit has every
    token stamped at the moment the cached answer was read: TTFT = E2E = lookup time.
    """

    request_id: str
    text: str
    completion: Completion
    latency_s: float
    cache_hit: bool

    @property
    def ttft_s(self) -> float | None:
        return self.completion.ttft_s

    @property
    def token_times_s(self) -> list[float]:
        return self.completion.token_times_s

    @property
    def finish_reason(self) -> str:
        return self.completion.finish_reason


@dataclass
class StreamEvent:
    """One piece of streamed text and when it was produced (perf_counter s); the last event of a
    stream has ``text == ""`` and ``response`` set."""

    text: str
    t_s: float
    response: ServiceResponse | None = None


def safe_prefix(text: str, stop: list[str] | None) -> str:
    """The part of ``text`` that can be sent: cut at a stop string, minus a tail that is the
    start of one (it may still complete into a stop string)."""
    if not stop:
        return text
    text, found = truncate_at_stop(text, stop)
    if found:
        return text
    hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - hold]
