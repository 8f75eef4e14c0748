"""The load tools' OpenAI-compatible HTTP client: streaming requests, every chunk time stamped.

The client streams chat completions (``stream: true``) with httpx and stamps each SSE chunk
that carries text as it arrives: TTFT, ITL and E2E are what a client of that server sees, over
the network stack, with the server's queueing included. Output token counts come from the
server's ``usage`` (``stream_options.include_usage``); TPOT is (last chunk - first chunk) /
(tokens - 1) (``labkit.metrics``). Works against labkit's server, vLLM's and any OpenAI-compatible
one (``ignore_eos`` is vLLM's extension; other servers may ignore it).

Load comes from ``labkit.bench.loadgen``: closed loop (``concurrency`` clients) or open loop
(``request_rate`` req/s on their own schedule, Poisson or gamma with a ``burstiness``, at most
``max_concurrency`` in flight; the run's ``concurrency`` is then None).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from labkit.engines.base import Request, TokenTimings, now

CONNECTIONS_PER_CLIENT = 16  # keep-alive connections per httpx client of the load generator


@dataclass
class HTTPCompletion(TokenTimings):
    """One request as the client saw it; has what ``labkit.metrics.summarize`` reads.

    ``token_times_s``: arrival time (perf_counter s) of each chunk that carried text.
    """

    request_id: str
    text: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str | None
    start_s: float
    token_times_s: list[float] = field(default_factory=list)
    end_s: float = 0.0
    status: int = 200
    error: str | None = None

    def _tokens_after_first(self) -> int:
        # an SSE chunk may carry several tokens: count what the server says it generated
        return self.output_tokens - 1


def request_body(request: Request, model: str, stream: bool = True) -> dict:
    """The JSON body of a chat (``messages``) or completion (``prompt``) request."""
    body = {"model": model, "max_tokens": request.max_tokens, "temperature": request.temperature,
            "top_p": request.top_p, "stream": stream, "ignore_eos": request.ignore_eos}
    if request.seed is not None:
        body["seed"] = request.seed
    if request.stop:
        body["stop"] = request.stop
    if stream:
        body["stream_options"] = {"include_usage": True}
    if request.messages is not None:
        body["messages"] = request.messages
    else:
        body["prompt"] = request.prompt
    return body


def parse_sse_line(line: str) -> dict | None:
    """The JSON of one ``data: {...}`` line; None for blank lines, comments and ``[DONE]``."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    return None if data == "[DONE]" else json.loads(data)


def openai_sender(client, model: str, stream: bool = True) -> Callable:
    """``send(request) -> HTTPCompletion`` over an ``httpx.AsyncClient`` whose ``base_url`` is
    the server root. A failed request (HTTP status >= 400) comes back with ``status``/``error``
    set and no tokens, so one rejection does not stop a load test."""

    async def send(request: Request) -> HTTPCompletion:
        chat = request.messages is not None
        path = "/v1/chat/completions" if chat else "/v1/completions"
        out = HTTPCompletion(request.request_id, "", 0, 0, None, now())
        async with client.stream("POST", path, json=request_body(request, model, stream)) as r:
            out.status = r.status_code
            if r.status_code >= 400:
                out.error = (await r.aread()).decode(errors="replace")[:500]
            elif not stream:
                body = json.loads(await r.aread())
                choice = body["choices"][0]
                out.text = choice["message"]["content"] if chat else choice["text"]
                out.finish_reason = choice["finish_reason"]
                out.token_times_s.append(now())
                _usage(out, body.get("usage"))
            else:
                async for line in r.aiter_lines():
                    chunk = parse_sse_line(line)
                    if chunk is None:
                        continue
                    if "error" in chunk:
                        out.error = chunk["error"].get("message")
                    for choice in chunk.get("choices") or ():
                        piece = (choice.get("delta") or {}).get("content") if chat \
                            else choice.get("text")
                        if piece:
                            out.token_times_s.append(now())
                            out.text += piece
                        out.finish_reason = choice.get("finish_reason") or out.finish_reason
                    _usage(out, chunk.get("usage"))
        out.end_s = now()
        if not out.output_tokens:
            out.output_tokens = len(out.token_times_s)  # no usage sent: one token per chunk
        return out

    return send


def _usage(out: HTTPCompletion, usage: dict | None) -> None:
    if usage:
        out.prompt_tokens = usage.get("prompt_tokens", 0)
        out.output_tokens = usage.get("completion_tokens", 0)


@contextlib.asynccontextmanager
async def load_sender(url: str, model: str, *, stream: bool = True, in_flight: int = 64,
                      timeout_s: float = 600.0, server_cache: bool = False):
    """``send(request) -> HTTPCompletion`` (``openai_sender``) for a load generator that keeps
    up to about ``in_flight`` requests open at once against the server root ``url``.

    Unless ``server_cache``, every request carries ``Cache-Control: no-cache``: a labkit server
    then runs it on the engine even when an identical request was answered before (a load test
    replays one workload per run; with the cache those replays would time Redis, not the model).
    Servers without a response cache (vLLM's) ignore the header.

    Several httpx clients, each request to the least busy one: httpcore's pool scans every
    connection (a socket syscall each) to place a request, so one pool of hundreds of
    connections made the load generator, not the server, the limit (2-core CPU, zero-compute
    engine, 256 streaming clients: about 1,100 output tokens/s with one pool, 5,000-5,300
    spread; ``results/frontend_ceiling.py``). No connection cap, so a request never waits
    inside the client.
    """
    import httpx

    shards = -(-max(in_flight, 1) // CONNECTIONS_PER_CLIENT)
    busy = [0] * shards
    async with contextlib.AsyncExitStack() as stack:
        senders = []
        for _ in range(shards):
            client = await stack.enter_async_context(httpx.AsyncClient(
                base_url=url.rstrip("/"), timeout=httpx.Timeout(timeout_s),
                headers=None if server_cache else {"Cache-Control": "no-cache"},
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=None)))
            senders.append(openai_sender(client, model, stream))

        async def send(request: Request) -> HTTPCompletion:
            i = min(range(shards), key=busy.__getitem__)
            busy[i] += 1
            try:
                return await senders[i](request)
            finally:
                busy[i] -= 1

        yield send


async def serve_load(url: str, requests: Sequence[Request], *, model: str,
                     concurrency: int | None = None, request_rate: float | None = None,
                     burstiness: float = 1.0, max_concurrency: int | None = None,
                     stream: bool = True, on_done: Callable | None = None, seed: int = 0,
                     server_cache: bool = False):
    """One load run against ``url``: closed loop at ``concurrency`` or open loop at
    ``request_rate`` req/s (``burstiness``, ``max_concurrency``: ``loadgen.open_loop``).
    Returns ``labkit.bench.loadgen.LoadResult`` (its completions are ``HTTPCompletion``).
    ``on_done(completion)`` is called as each request finishes. ``server_cache``: let the
    server answer from its response cache (see ``load_sender``)."""
    from labkit.bench.loadgen import closed_loop, open_loop

    if (concurrency is None) == (request_rate is None):
        raise ValueError("give exactly one of concurrency= (closed loop) or request_rate= "
                         f"(open loop); got {concurrency!r}, {request_rate!r}")
    async with load_sender(url, model, stream=stream,
                           in_flight=concurrency or max_concurrency or 64,
                           server_cache=server_cache) as send:
        if on_done is not None:
            inner = send

            async def send(request):  # noqa: F811 - wraps the sender with the callback
                done = await inner(request)
                on_done(done)
                return done
        if concurrency is not None:
            return await closed_loop(send, requests, concurrency)
        return await open_loop(send, requests, request_rate, burstiness=burstiness,
                               max_concurrency=max_concurrency, seed=seed)


def server_info(url: str) -> dict:
    """The served model id, and the engine name from ``/health`` when the server has one."""
    import httpx

    base = url.rstrip("/")
    try:
        models = httpx.get(base + "/v1/models", timeout=10).raise_for_status().json()["data"]
    except httpx.HTTPError as err:
        raise RuntimeError(f"cannot reach an OpenAI-compatible server at {url!r}: {err}") from err
    except (ValueError, KeyError, TypeError) as err:
        raise RuntimeError(f"{url!r} answered /v1/models with no model list; is it an "
                           "OpenAI-compatible server?") from err
    if not models:
        raise RuntimeError(f"{url!r} serves no model (/v1/models is empty)")
    info = {"model": models[0]["id"], "engine": "unknown"}
    try:
        info["engine"] = httpx.get(base + "/health", timeout=10).json().get("engine", "unknown")
    except (httpx.HTTPError, ValueError):
        pass
    return info
