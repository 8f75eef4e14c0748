"""``labkit bench serve --url URL``: load an OpenAI-compatible server and time every token.

The client streams chat completions (``stream: true``) with httpx and stamps each SSE chunk
that carries text as it arrives: TTFT, ITL and E2E are what a client of that server sees, over
the network stack, with the server's queueing included. Output token counts come from the
server's ``usage`` (``stream_options.include_usage``); TPOT is (last chunk - first chunk) /
(tokens - 1) (``labkit.metrics``). Works against labkit's server, vLLM's and any OpenAI-compatible
one (``ignore_eos`` is vLLM's extension; other servers may ignore it).

Load comes from ``labkit.bench``: closed loop (one run per concurrency) or open loop (Poisson
``request_rate`` req/s, the concurrency then caps nothing and is reported as None).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from labkit.engines.base import Engine, Request, TokenTimings, now

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
                     stream: bool = True, on_done: Callable | None = None, seed: int = 0,
                     server_cache: bool = False):
    """One load run against ``url``: closed loop at ``concurrency`` or open loop at
    ``request_rate`` req/s. Returns ``labkit.bench.LoadResult`` (its completions are
    ``HTTPCompletion``). ``on_done(completion)`` is called as each request finishes.
    ``server_cache``: let the server answer from its response cache (see ``load_sender``)."""
    from labkit.bench import closed_loop, open_loop

    if (concurrency is None) == (request_rate is None):
        raise ValueError("give exactly one of concurrency= (closed loop) or request_rate= "
                         f"(open loop); got {concurrency!r}, {request_rate!r}")
    async with load_sender(url, model, stream=stream, in_flight=concurrency or 64,
                           server_cache=server_cache) as send:
        if on_done is not None:
            inner = send

            async def send(request):  # noqa: F811 - wraps the sender with the callback
                done = await inner(request)
                on_done(done)
                return done
        if concurrency is not None:
            return await closed_loop(send, requests, concurrency)
        return await open_loop(send, requests, request_rate, seed=seed)


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


def _cache_hits(url: str) -> int | None:
    import httpx

    try:
        return httpx.get(url.rstrip("/") + "/metrics", timeout=10).json().get("cache_hits")
    except (httpx.HTTPError, ValueError):
        return None  # not a labkit server


def run_serve_bench(url: str, concurrencies: Sequence[int] = (1, 4, 16),
                    num_requests: int = 32, model: str | None = None, stream: bool = True,
                    request_rate: float | None = None, json_path: str | Path | None = None,
                    *, min_output_tokens: int = 16, max_output_tokens: int = 16,
                    output_len_dist: str = "fixed", seed: int = 0, warmup: int = 2,
                    workload: Sequence[Request] | None = None, view=None,
                    server_cache: bool = False) -> dict:
    """The ``serve`` bench: one run per concurrency (or one open-loop run at ``request_rate``).

    Requests: ``labkit.bench.make_workload(num_requests, ...)`` (chat, greedy, ``ignore_eos``)
    unless ``workload`` is given. ``warmup`` requests are sent first and not counted. Each run
    has the contract's fields plus ``failed`` (requests with an HTTP error; the statistics are
    over the others), ``cache_hits`` (labkit servers: hits during the run), ``stream`` and
    ``server_cache``. Requests bypass a labkit server's response cache unless ``server_cache``
    (see ``load_sender``), so every run times the model. ``view``: a ``labkit.widgets`` live view
    (its ``start``/``update``/``finish`` are called). Writes ``json_path`` if given.
    """
    from labkit.bench import make_workload, run_sync, write_json
    from labkit.metrics import bench_document, summarize

    info = server_info(url)
    model = model or info["model"]
    requests = list(workload) if workload is not None else make_workload(
        num_requests, seed=seed, min_output_tokens=min_output_tokens,
        max_output_tokens=max_output_tokens, output_len_dist=output_len_dist)
    if warmup:
        run_sync(serve_load(url, requests[:warmup], model=model, concurrency=warmup,
                            stream=stream, server_cache=server_cache))
    settings = [(None, request_rate)] if request_rate is not None else \
        [(c, None) for c in concurrencies]
    runs = []
    for concurrency, rate in settings:
        hits_before = _cache_hits(url)
        label = f"concurrency {concurrency}" if concurrency else f"{rate} req/s"
        if view is not None:
            view.start(len(requests), label)
        t0 = time.perf_counter()
        result = run_sync(serve_load(url, requests, model=model, concurrency=concurrency,
                                     request_rate=rate, stream=stream,
                                     on_done=view.update if view is not None else None,
                                     seed=seed, server_cache=server_cache))
        ok = [c for c in result.completions if c.error is None]
        if view is not None:
            view.finish()
        hits_after = _cache_hits(url)
        runs.append(summarize(ok, result.duration_s or
                              time.perf_counter() - t0, name="serve", concurrency=concurrency,
                              request_rate=rate, failed=len(result.completions) - len(ok),
                              max_in_flight=result.max_in_flight, stream=stream,
                              server_cache=server_cache,
                              cache_hits=None if hits_before is None or hits_after is None
                              else hits_after - hits_before))
    doc = bench_document("serve", runs, engine=info["engine"], model=model, url=url)
    if json_path is not None:
        write_json(doc, json_path)
    return doc


# --- in-process measurements for the serving lab ------------------------------------------------
@dataclass
class _Answer:
    """A naive-service answer shaped for ``summarize``: no stream, so TTFT = E2E."""

    request_id: str
    text: str
    output_tokens: int
    start_s: float
    end_s: float
    token_times_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    tpot_s: float | None = None

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def ttft_s(self) -> float:
        return self.e2e_s


class CountingEngine(Engine):
    """Wraps an engine and counts the requests it is asked to generate (duplicates show)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine.model_name, engine.device, engine.dtype)
        self.inner, self.requests = engine, 0
        self.name, self.continuous = engine.name, engine.continuous
        self.tokenizer = getattr(engine, "tokenizer", None)

    def generate(self, requests, on_token=None):
        self.requests += len(requests)
        return self.inner.generate(requests, on_token)


def expected_texts(engine, requests: Sequence[Request]) -> dict[str, str]:
    """Each request's own unbatched greedy text, by request id (one engine call per prompt at
    the longest ``max_tokens``; shorter requests take a prefix of its tokens)."""
    longest: dict[str, int] = {}
    for r in requests:
        longest[r.prompt] = max(longest.get(r.prompt, 0), r.max_tokens)
    tokens = {p: engine.generate([Request(prompt=p, max_tokens=m)])[0].token_ids
              for p, m in longest.items()}
    return {r.request_id: engine.tokenizer.decode(tokens[r.prompt][:r.max_tokens],
                                                  skip_special_tokens=True) for r in requests}


async def compare_naive_and_fixed(engine, requests: Sequence[Request], concurrency: int, *,
                                  batch_size: int = 4, cache_factory=None) -> list[dict]:
    """The same closed-loop load through the course's reference service and ``InferenceService``.

    Returns one row per design: requests/s, E2E and TTFT p50/p99 (s), ``engine_requests`` (rows
    the engine generated: more than the requests means duplicates), ``wrong`` (answers that are
    not the request's own unbatched greedy text; a fixed-service answer that parts from it at a
    floating-point near-tie would also count, and is rare). Requests must be greedy prompts.
    """
    from labkit.bench import closed_loop
    from labkit.metrics import summarize
    from labkit.reference import GenerationRequest, OptimizationConfig, OptimizedInferenceService
    from labkit.service import InferenceService

    expected = expected_texts(engine, requests)
    rows = []
    counted = CountingEngine(engine)
    naive = OptimizedInferenceService(counted, OptimizationConfig(
        batch_size=batch_size, max_tokens=max(r.max_tokens for r in requests), temperature=0.0))

    async def send_naive(r: Request) -> _Answer:
        t0 = now()
        out = await naive(GenerationRequest(prompt=r.prompt, max_tokens=r.max_tokens,
                                            temperature=r.temperature))
        n = len(engine.tokenizer(out.text, add_special_tokens=False)["input_ids"])
        return _Answer(r.request_id, out.text, n, t0, now())

    fixed = InferenceService(counted, cache_factory() if cache_factory else None,
                             max_batch_size=batch_size, max_wait_ms=20)

    async def send_fixed(r: Request):
        return await fixed.complete(r)

    for name, send in (("naive (reference)", send_naive), ("fixed (InferenceService)",
                                                            send_fixed)):
        counted.requests = 0
        result = await closed_loop(send, requests, concurrency)
        run = summarize(result.completions, result.duration_s, name=name, concurrency=concurrency)
        wrong = sum(c.text != expected[r.request_id]
                    for c, r in zip(result.completions, requests))
        rows.append({"design": name, "requests_per_s": run["requests_per_s"],
                     "e2e_p50_s": run["e2e_s"]["p50"], "e2e_p99_s": run["e2e_s"]["p99"],
                     "ttft_p50_s": run["ttft_s"]["p50"], "engine_requests": counted.requests,
                     "requests": len(requests), "wrong": wrong})
    await fixed.aclose()
    return rows


async def service_vs_offline(engine, requests: Sequence[Request], concurrency: int = 16) -> dict:
    """Output tokens/s of ``engine.generate`` in batches of ``concurrency`` (offline) against the
    same requests sent by ``concurrency`` closed-loop clients through ``InferenceService`` (no
    cache, batcher ``max_batch_size=concurrency``). Use ``ignore_eos`` requests: fixed lengths."""
    from labkit.bench import closed_loop
    from labkit.service import InferenceService

    engine.generate([dataclasses.replace(r, max_tokens=2) for r in requests[:concurrency]])
    t0 = now()  # (after one untimed warm-up batch of the same shape)
    tokens = 0
    for i in range(0, len(requests), concurrency):
        tokens += sum(c.output_tokens for c in engine.generate(requests[i:i + concurrency]))
    offline = tokens / (now() - t0)
    async with InferenceService(engine, max_batch_size=concurrency, max_wait_ms=20) as service:
        result = await closed_loop(service.complete, requests, concurrency)
        batch = service.metrics()["batching"]["mean_batch_size"]
    served = sum(c.output_tokens for c in result.completions) / result.duration_s
    return {"offline_tokens_per_s": offline, "service_tokens_per_s": served,
            "ratio": served / offline, "concurrency": concurrency,
            "mean_batch_size": batch}


def short_workload(n: int, output_tokens: int, *, max_prompt_chars: int = 120, chat: bool = True,
                   seed: int = 0) -> list[Request]:
    """``n`` distinct fixed-length (``ignore_eos``) greedy requests over the bundled prompts no
    longer than ``max_prompt_chars`` characters, cycled and numbered past the first pass
    (``labkit.bench.distinct_prompt``). Padding a static batch to one long prompt makes a
    CPU prefill-bound, which hides what batching does for decode; short prompts keep the
    serving lab's comparisons about decode."""
    from labkit.bench import distinct_prompt, load_prompts

    prompts = [r["prompt"] for r in load_prompts() if len(r["prompt"]) <= max_prompt_chars]
    if not prompts:
        raise ValueError(f"no bundled prompt has <= {max_prompt_chars} characters")
    out = []
    for i in range(n):
        p = distinct_prompt(prompts[(i + seed) % len(prompts)], i, len(prompts))
        kind = {"messages": [{"role": "user", "content": p}]} if chat else {"prompt": p}
        out.append(Request(**kind, max_tokens=output_tokens, ignore_eos=True,
                           request_id=f"sw-{seed}-{i}"))
    return out
