"""Where an app's time goes: one run of the capstone workload with the engine and loop watched.

``profile_app(factory, engine, workload)`` (lab 07, "Profile it") runs the workload once through
``factory(TimedEngine(engine))`` beside a ticker task on the same event loop, and returns an
``AppProfile``: the run's wall time split into prefill, decode of the tokens callers received,
decode of tokens they never received, and time outside the engine; how many requests reached the
engine against how many were distinct; requests per engine call; and the longest the event loop
could not run the ticker (a blocked loop serves nobody else meanwhile).

Times are seconds (``perf_counter``), stalls milliseconds. The split adds up per engine call:
prefill is call start to its first token, decode the rest of the call; "discarded" decode is the
part of a call after every request in it had produced the tokens its caller got back. For an
engine that runs calls side by side (continuous engines) the engine times overlap and can sum to
more than the wall time. The run is also a trial of the app (``AppProfile.measurement``): the
watching adds a time stamp per engine call, and a ticker that a blocked loop never runs.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from labkit.bench.capstone import AppFactory, CapstoneWorkload, Measurement
from labkit.engines.base import Completion, Engine, now
from labkit.engines.counting import CountingEngine


@dataclass
class EngineCall:
    """One ``generate`` call: start, first token and end (s), and its completions."""

    start_s: float
    first_token_s: float
    end_s: float
    completions: list[Completion] = field(default_factory=list)


class TimedEngine(CountingEngine):
    """A ``CountingEngine`` that also keeps every call's times and completions (``calls``)."""

    def reset(self) -> None:
        """Forget every count and call."""
        super().reset()
        self.calls: list[EngineCall] = []

    def generate(self, requests, on_token=None):
        start = now()
        out = super().generate(requests, on_token)
        end = now()
        first = min((c.token_times_s[0] for c in out if c.token_times_s), default=end)
        self.calls.append(EngineCall(start, first, end, list(out)))
        return out


@dataclass(frozen=True)
class AppProfile:
    """One profiled run (see the module doc). Seconds unless named otherwise; ``measurement``
    is the run as a trial of the app (``Ledger(..., first=...)`` counts it as one)."""

    wall_s: float
    prefill_s: float
    decode_returned_s: float
    decode_discarded_s: float
    requests: int
    distinct_requests: int
    engine_requests: int
    engine_calls: int
    tokens_generated: int
    tokens_returned: int
    max_loop_stall_ms: float
    shortest_call_s: float
    measurement: Measurement

    @property
    def engine_s(self) -> float:
        """Time inside engine calls (s)."""
        return self.prefill_s + self.decode_returned_s + self.decode_discarded_s

    @property
    def outside_engine_s(self) -> float:
        """Wall time not spent in an engine call (s; 0 when calls overlap)."""
        return max(self.wall_s - self.engine_s, 0.0)

    @property
    def mean_batch_size(self) -> float:
        """Requests per engine call."""
        return self.engine_requests / self.engine_calls if self.engine_calls else 0.0

    def breakdown(self) -> dict[str, float]:
        """Where the wall time went, in seconds, by part (for a bar chart)."""
        return {"prefill": self.prefill_s, "decode, tokens returned": self.decode_returned_s,
                "decode, tokens thrown away": self.decode_discarded_s,
                "outside the engine": self.outside_engine_s}

    def table(self) -> dict[str, float | int]:
        """The counters and times as one flat dict (units in the names)."""
        return {"wall_s": self.wall_s, "engine_s": self.engine_s, **{
            f"{k.replace(', ', '_').replace(' ', '_')}_s": v for k, v in self.breakdown().items()},
            "requests": self.requests, "distinct_requests": self.distinct_requests,
            "engine_requests": self.engine_requests, "engine_calls": self.engine_calls,
            "mean_batch_size": self.mean_batch_size, "tokens_generated": self.tokens_generated,
            "tokens_returned": self.tokens_returned, "max_loop_stall_ms": self.max_loop_stall_ms,
            "shortest_call_s": self.shortest_call_s}


def profile_app(factory: AppFactory, engine: Engine, workload: CapstoneWorkload,
                tick_ms: float = 5.0) -> AppProfile:
    """Run ``workload`` once through ``factory(TimedEngine(engine))`` and split its time (see
    the module doc); a ticker every ``tick_ms`` ms measures how long the event loop stalls."""
    from labkit.bench.capstone import run_trial
    from labkit.bench.loadgen import run_sync

    if not tick_ms > 0:
        raise ValueError(f"tick_ms must be > 0 (milliseconds), got {tick_ms!r}")
    timed = TimedEngine(engine)

    async def main():
        ticks = [now()]

        async def ticker() -> None:
            while True:
                await asyncio.sleep(tick_ms / 1000)
                ticks.append(now())

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        try:
            trial, completions = await run_trial(factory(timed), workload, timed)
        finally:
            task.cancel()
        ticks.append(now())
        return trial, completions, max(b - a for a, b in zip(ticks, ticks[1:]))

    trial, completions, stall_s = run_sync(main())
    returned = {c.request_id: c.output_tokens for c in completions}
    prefill = kept = thrown = 0.0
    for call in timed.calls:
        prefill += call.first_token_s - call.start_s
        # when every request of the call had produced the tokens its caller got back
        last_kept = max((c.token_times_s[min(returned.get(c.request_id, c.output_tokens),
                                             c.output_tokens) - 1]
                         for c in call.completions if c.token_times_s
                         and returned.get(c.request_id, c.output_tokens) > 0),
                        default=call.first_token_s)
        kept += last_kept - call.first_token_s
        thrown += call.end_s - last_kept
    return AppProfile(
        wall_s=trial.duration_s, prefill_s=prefill, decode_returned_s=kept,
        decode_discarded_s=thrown, requests=len(workload.requests),
        distinct_requests=workload.distinct, engine_requests=timed.requests,
        engine_calls=len(timed.calls),
        tokens_generated=sum(c.output_tokens for call in timed.calls for c in call.completions),
        tokens_returned=sum(c.output_tokens for c in completions),
        max_loop_stall_ms=stall_s * 1000,
        shortest_call_s=min((c.end_s - c.start_s for c in timed.calls), default=0.0),
        measurement=Measurement([trial], {r.request_id: c for r, c in
                                          zip(workload.requests, completions)}))
