"""A fake OpenAI-compatible server of known timing: what the load generator is checked against.

A request waits for one of ``slots`` (None: no limit; first come, first served beyond it), then
its first token comes ``ttft_s`` after it got the slot and each next one ``itl_s`` later, one SSE
chunk per token (stamped on a schedule kept from the first token, so sleep overshoots do not add
up). The slot is held until the last token. So for a request that found a free slot the truth
is::

    TTFT = ttft_s    TPOT = ITL = itl_s    E2E = ttft_s + (max_tokens - 1) * itl_s

and with ``slots=1`` it is a single-server queue with a fixed service time, E2E above (under
Poisson arrivals: the M/D/1 queue). ``itl_per_running_s`` makes it a batching server: each gap
grows by that much for every other request running at that moment, as a decode step grows with
the batch, so more slots give more tokens/s and a longer TPOT. ``ttft_s = itl_s = 0`` is the
zero-compute server against which ``labkit.bench.ceiling`` measures the load generator's own
ceiling: each response is then written in one piece. Used by the tests of ``labkit bench
serve`` and by lab 05, section 7::

    with FakeServer(ttft_s=0.1, itl_s=0.02) as server:     # a thread of this process
        run_serve_bench(server.url, request_rates=[4.0])
    python -m labkit.bench.fake_server --port 8123 --ttft-ms 100 --itl-ms 20   # its own process

Endpoints: ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions`` (streaming with
``usage`` in the last chunk, or one JSON body), ``/health``, ``/metrics`` (requests served,
most running at once).
"""

import argparse
import asyncio
import itertools
import json

from labkit.serving.app_thread import AppThread

MODEL = "fake-model"
TOKEN = " tok"  # the text of every output token


def _chunk(rid: str, chat: bool, text: str | None, finish: str | None, model: str) -> dict:
    choice = {"index": 0, "finish_reason": finish}
    if chat:
        choice["delta"] = {"content": text} if text is not None else {}
    else:
        choice["text"] = text or ""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "model": model, "choices": [choice]}


def create_app(ttft_s: float = 0.1, itl_s: float = 0.02, slots: int | None = None,
               model: str = MODEL, itl_per_running_s: float = 0.0):
    """The FastAPI app of the fake server (see the module docstring for its timing).

    (No ``from __future__ import annotations`` in this module: FastAPI reads the handlers'
    ``Request`` annotation as a class, not as a string to look up in the module.)"""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    if min(ttft_s, itl_s, itl_per_running_s) < 0:
        raise ValueError(f"ttft_s, itl_s and itl_per_running_s must be >= 0 s, got {ttft_s!r}, "
                         f"{itl_s!r}, {itl_per_running_s!r}")
    if slots is not None and slots < 1:
        raise ValueError(f"slots must be >= 1 (or None: no limit), got {slots!r}")
    app = FastAPI(title="labkit fake server")
    counts = {"requests": 0, "running": 0, "max_running": 0}
    ids = itertools.count()
    gate: list[asyncio.Semaphore] = []  # made on the server's own event loop, on first use

    async def tokens(n: int):
        """Wait for a slot, then yield once per token at its scheduled time."""
        if slots is not None and not gate:
            gate.append(asyncio.Semaphore(slots))
        if gate:
            await gate[0].acquire()
        counts["running"] += 1
        counts["max_running"] = max(counts["max_running"], counts["running"])
        loop = asyncio.get_running_loop()
        try:
            due = loop.time() + ttft_s
            for k in range(n):
                if k:
                    due += itl_s + itl_per_running_s * (counts["running"] - 1)
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                yield k
        finally:
            counts["running"] -= 1
            counts["requests"] += 1
            if gate:
                gate[0].release()

    async def respond(request: Request, chat: bool):
        body = await request.json()
        n = max(1, int(body.get("max_tokens") or 16))
        rid = f"fake-{next(ids)}"
        usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
        if not body.get("stream"):
            async for _ in tokens(n):
                pass
            choice = {"index": 0, "finish_reason": "length"}
            if chat:
                choice["message"] = {"role": "assistant", "content": TOKEN * n}
            else:
                choice["text"] = TOKEN * n
            return JSONResponse({"id": rid, "object": "chat.completion" if chat else
                                 "text_completion", "model": model, "choices": [choice],
                                 "usage": usage})
        with_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def event(obj) -> str:
            return "data: " + json.dumps(obj, separators=(",", ":")) + "\n\n"

        async def events():
            pending = []
            async for k in tokens(n):
                pending.append(event(_chunk(rid, chat, TOKEN, "length" if k == n - 1 else None,
                                            model)))
                if itl_s > 0 or ttft_s > 0:  # zero compute: one write for the whole stream
                    yield "".join(pending)
                    pending.clear()
            if with_usage:
                pending.append(event({"id": rid, "object": "chat.completion.chunk", "model": model,
                                      "choices": [], "usage": usage}))
            yield "".join(pending) + "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, chat=False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model, "object": "model",
                                            "owned_by": "labkit"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "engine": "fake-server", "ttft_s": ttft_s, "itl_s": itl_s,
                "slots": slots}

    @app.get("/metrics")
    async def metrics():
        return dict(counts)

    return app


class FakeServer(AppThread):
    """The fake server on a daemon thread of this process; ``with FakeServer(...) as s: s.url``.

    Same knobs as ``create_app``. (``labkit.serving.http.BackgroundServer`` does the same for an
    ``InferenceService``; both are ``labkit.serving.app_thread.AppThread``.)
    """

    def __init__(self, ttft_s: float = 0.1, itl_s: float = 0.02, slots: int | None = None, *,
                 itl_per_running_s: float = 0.0, model: str = MODEL, host: str = "127.0.0.1",
                 port: int | None = None) -> None:
        self.ttft_s, self.itl_s, self.slots = ttft_s, itl_s, slots
        self.itl_per_running_s = itl_per_running_s
        super().__init__(create_app(ttft_s, itl_s, slots, model, itl_per_running_s), host, port,
                         name="labkit-fake", lifespan="off", access_log=False)

    def service_time_s(self, max_tokens: int, running: int = 1) -> float:
        """Seconds a request of ``max_tokens`` tokens holds its slot while ``running`` requests
        (itself included) run all along: its true E2E when it did not wait for a slot."""
        return self.ttft_s + (max_tokens - 1) * (self.itl_s
                                                  + self.itl_per_running_s * (running - 1))



def main(argv: list[str] | None = None) -> None:
    """``python -m labkit.bench.fake_server``: serve the fake server in this process."""
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m labkit.bench.fake_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--ttft-ms", type=float, default=100.0, help="first token after (ms)")
    p.add_argument("--itl-ms", type=float, default=20.0, help="gap between tokens (ms)")
    p.add_argument("--slots", type=int, help="requests served at once (default: no limit)")
    p.add_argument("--itl-per-running-ms", type=float, default=0.0, help="each gap grows by "
                   "this for every other request running (ms)")
    args = p.parse_args(argv)
    app = create_app(args.ttft_ms / 1e3, args.itl_ms / 1e3, args.slots,
                     itl_per_running_s=args.itl_per_running_ms / 1e3)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
