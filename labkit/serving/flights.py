"""Coalescing: identical cacheable requests that miss the cache together share one generation.

``InferenceService`` sends every keyed cache miss through ``Flights.share(key, request,
on_delta)``. The first request of a key starts a *flight*: its generation and then the cache
store run in a task of their own. An identical request (same key) that misses while that flight
is under way joins it instead of generating again, and gets its text from the start. So N
identical requests in flight cost one generation and one store.

A caller that leaves only stops listening: the flight runs on for the others. When the last
caller of a flight has left, nobody wants its answer any more: the flight's request is cancelled
(the engine stops it at its next step), the flight is forgotten at once (an identical request
that comes later starts a new one) and its aborted completion is never stored.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from labkit.engines.base import ABORTED, Completion, Request, now
from labkit.serving.batchers import DeltaCallback


@dataclass
class _Flight:
    """One generation shared by the identical requests of one key."""

    request: Request
    task: asyncio.Future | None = None
    text: str = ""
    waiters: int = 0  # callers awaiting this flight now
    listeners: list[DeltaCallback] = dataclasses.field(default_factory=list)

    def deliver(self, delta: str, t_s: float) -> None:
        self.text += delta
        for listener in list(self.listeners):
            listener(delta, t_s)


class Flights:
    """The flights in progress, by key (see module doc).

    ``generate(request, on_delta)`` runs one request (``Batcher.submit``); ``store(key,
    completion)`` puts a finished one in the cache.
    """

    def __init__(self, generate: Callable[[Request, DeltaCallback], Awaitable[Completion]],
                 store: Callable[[str, Completion], Awaitable[object]]) -> None:
        self._generate, self._store = generate, store
        self._flights: dict[str, _Flight] = {}

    def __contains__(self, key: str) -> bool:
        """True while a flight of ``key`` is under way: a new request of that key joins it."""
        return key in self._flights

    async def share(self, key: str, request: Request,
                    on_delta: DeltaCallback | None) -> Completion:
        """The completion of ``key``'s flight, started with ``request`` unless one is under way;
        ``on_delta`` gets the flight's text so far at once, then each new piece."""
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight(request)
            flight.task = asyncio.ensure_future(self._fly(key, flight))
            flight.task.add_done_callback(lambda task: self._landed(key, flight, task))
            self._flights[key] = flight
        flight.waiters += 1
        if on_delta is not None:
            if flight.text:
                on_delta(flight.text, now())
            flight.listeners.append(on_delta)
        try:
            return await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if on_delta is not None and on_delta in flight.listeners:
                flight.listeners.remove(on_delta)
            if flight.waiters == 0 and not flight.task.done():  # the last caller left
                flight.request.cancel()
                self._forget(key, flight)

    async def _fly(self, key: str, flight: _Flight) -> Completion:
        """Generate the flight's request, then store it (unless it was aborted)."""
        completion = await self._generate(flight.request, flight.deliver)
        if completion.finish_reason != ABORTED:
            await self._store(key, completion)
        return completion

    def _landed(self, key: str, flight: _Flight, task: asyncio.Future) -> None:
        """The flight is over: forget it, and read its error (its callers may all have left)."""
        self._forget(key, flight)
        if not task.cancelled():
            task.exception()

    def _forget(self, key: str, flight: _Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
