"""``Handoff``: text deltas from an engine's thread to the event loop, one wake-up per burst.

An engine calls ``on_token`` on its own thread once per token per request; each call has to
reach the event loop that streams the answer. ``loop.call_soon_threadsafe`` per token costs a
lock, a self-pipe write and an event-loop wake-up each time: at 256 streams x 100 steps/s that
is 25,600 wake-ups a second, all holding the GIL that the engine's step thread needs next. A
``Handoff`` queues the calls and wakes the loop only when its queue was empty, so a step that
produces a token for every live request costs one wake-up, and the loop runs them in order.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable


class Handoff:
    """Run ``fn(*args)`` on ``loop`` soon, in call order, from any thread (``put``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._calls: list[tuple[Callable, tuple]] = []
        self._lock = threading.Lock()
        self._scheduled = False  # a drain is queued on the loop and has not taken the calls yet
        self.wakeups = 0  # how often ``put`` woke the loop (tests and profiles read it)

    def put(self, fn: Callable, *args) -> None:
        """Queue ``fn(*args)``; wake the loop unless a wake-up is already on its way."""
        with self._lock:
            self._calls.append((fn, args))
            if self._scheduled:
                return
            self._scheduled = True
            self.wakeups += 1
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody is left to hear it
            with self._lock:
                self._calls.clear()

    def _drain(self) -> None:
        with self._lock:
            calls, self._calls, self._scheduled = self._calls, [], False
        for fn, args in calls:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 (one bad callback must not drop the rest)
                self.loop.call_exception_handler({"message": "Handoff callback failed",
                                                  "exception": exc})


_HANDOFFS: dict[asyncio.AbstractEventLoop, Handoff] = {}


def handoff_for(loop: asyncio.AbstractEventLoop) -> Handoff:
    """The one ``Handoff`` of ``loop`` (made on first use), shared by every batcher on it."""
    h = _HANDOFFS.get(loop)
    if h is None:
        for old in [lp for lp in _HANDOFFS if lp.is_closed()]:
            del _HANDOFFS[old]
        h = _HANDOFFS[loop] = Handoff(loop)
    return h
