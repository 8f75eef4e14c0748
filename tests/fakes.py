"""Pieces shared by the fake engines of the service, HTTP and batcher tests."""

from __future__ import annotations

import time

from labkit.engines.base import now


def stream_words(words: list[list[str]], step_s: float, on_token=None) -> list[list[float]]:
    """'Decode' one word of every sequence each ``step_s`` seconds, calling ``on_token`` like a
    real engine (index, step, text delta, time); returns each sequence's token times (s)."""
    times: list[list[float]] = [[] for _ in words]
    for step in range(max(map(len, words), default=0)):
        time.sleep(step_s)
        t = now()
        for i, w in enumerate(words):
            if step < len(w):
                times[i].append(t)
                if on_token is not None:
                    on_token(i, step, (" " if step else "") + w[step], t)
    return times
