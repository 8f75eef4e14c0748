"""Autoscaling measured: a step in load against a Ray Serve deployment, and what the replicas did.

``load_step`` runs closed-loop clients that step from ``low`` to ``high`` and back while sampling
the deployment's replica counts (running, and starting: decided but still loading) every second;
``plot_load_step`` draws replicas and each request's E2E latency over time, so the lag between
the load and the new replicas shows. Used by the scale-out lab (lab 06) on a
``labkit.serving.deploy`` deployment.
"""

from __future__ import annotations

import asyncio

from labkit.serving.deploy import ServeDeployment


async def load_step(dep: ServeDeployment, requests, *, low: int = 1, high: int = 8,
                    step_at_s: float = 5.0, step_for_s: float = 25.0, total_s: float = 40.0,
                    sample_every_s: float = 1.0) -> dict:
    """Closed-loop load of ``low`` clients, raised to ``high`` clients from ``step_at_s`` for
    ``step_for_s`` seconds, for ``total_s`` seconds in all; requests cycle through ``requests``.

    Returns ``{"samples": [(t_s, running, starting)], "requests": [(t_done_s, e2e_s, phase)],
    ...}`` with times in seconds from the start (``phase``: ``"low"`` or ``"step"``). Replica
    counts (RUNNING, and STARTING: decided but still loading) come from ``serve.status()``
    every ``sample_every_s``.
    """
    import itertools

    from labkit.bench.client import load_sender
    from labkit.engines.base import now

    cycle = itertools.cycle(requests)
    done: list[tuple[float, float, str]] = []
    samples: list[tuple[float, int]] = []
    async with load_sender(dep.url, dep.model, in_flight=high, timeout_s=300.0) as send:
        t0 = now()

        async def user(start_s: float, stop_s: float, phase: str) -> None:
            await asyncio.sleep(start_s)
            while now() - t0 < stop_s:
                c = await send(next(cycle))
                if c.error is None:
                    done.append((c.end_s - t0, c.e2e_s, phase))

        async def sampler() -> None:
            while now() - t0 < total_s:
                states = await asyncio.to_thread(dep.replica_states)
                samples.append((now() - t0, states.get("RUNNING", 0),
                                states.get("STARTING", 0)))
                await asyncio.sleep(sample_every_s)

        users = [user(0.0, total_s, "low") for _ in range(low)]
        users += [user(step_at_s, step_at_s + step_for_s, "step") for _ in range(high - low)]
        await asyncio.gather(sampler(), *users)
    return {"samples": samples, "requests": done, "low": low, "high": high,
            "step_at_s": step_at_s, "step_for_s": step_for_s, "total_s": total_s}


def plot_load_step(trace: dict):
    """Two panels over time (s): replicas (running; running + starting), and each request's
    E2E latency (s)."""
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 4.8), sharex=True, layout="constrained")
    ts, running, starting = zip(*trace["samples"]) if trace["samples"] else ((), (), ())
    top.step(ts, running, where="post", label="running")
    top.step(ts, [r + s for r, s in zip(running, starting)], "--", where="post",
             label="running + starting")
    top.set_ylabel("replicas (count)")
    top.set_ylim(0, max(running + starting or (1,)) + 1.5)
    for ax in (top, bottom):
        ax.axvspan(trace["step_at_s"], trace["step_at_s"] + trace["step_for_s"], alpha=0.12,
                   label=f"load step: {trace['low']} -> {trace['high']} clients")
        ax.grid(True, alpha=0.3)
    if trace["requests"]:
        t_done, e2e, _ = zip(*trace["requests"])
        bottom.plot(t_done, e2e, ".", label="one request")
    bottom.set_xlabel("time since the load started (s)")
    bottom.set_ylabel("E2E latency (s)")
    top.legend(loc="upper left")
    return fig
