"""An OpenAI-compatible HTTP front for ``InferenceService`` (FastAPI), and ``serve`` to run it.

Endpoints (the subset of OpenAI's API that labs and load tools use):

- ``POST /v1/completions``       ``prompt`` (a string or a list of strings)
- ``POST /v1/chat/completions``  ``messages``
  both with ``model, max_tokens, temperature, top_p, seed, stop, stream, stream_options``, and
  vLLM's extension ``ignore_eos`` (benchmarks: always produce ``max_tokens`` tokens).
  ``stream: true`` answers with Server-Sent Events: ``data: {chunk}\\n\\n`` ..., ``data: [DONE]``.
- ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (the service's metrics as JSON).

A request with the header ``Cache-Control: no-cache`` (or ``no-store``) skips the response
cache: it runs on the engine, is not shared with identical requests in flight and is not
stored. Load generators send it (``labkit.bench.client``) so they measure the model, not Redis.

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}`` (the wire format
is ``labkit.serving.openai_api``), whatever goes wrong: a malformed body, a bad field (strict
types), an empty prompt or one beyond the model's context (``context_length_exceeded``) is 400
and names the field and what is allowed; an unknown model or route is 404, a wrong method 405;
a body over ``max_body_bytes`` is 413; overload and shutdown are 503 with ``Retry-After``
(OpenAI clients retry 503 on their own); a generation stopped at the service's deadline is 504;
anything else is a 500 that leaves the connection usable. A streamed request that fails before
its first token gets the same status codes; after that, the error is the stream's last event.

Bounded work: a client that hangs up cancels its request (the engine stops generating it), and
on SIGTERM or Ctrl-C ``serve`` gives the requests in flight ``drain_s`` seconds, then cancels
them, so the server exits within about ``drain_s`` plus one decode step.

Defaults follow OpenAI's API: ``temperature=1`` (sampled, so not cached: send
``temperature=0`` for greedy, cacheable answers), ``max_tokens=16`` for completions; chat
completions default to labkit's ``DEFAULT_MAX_TOKENS``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager

from starlette.requests import Request as HTTPRequest

from labkit.config import DEFAULT_MODEL
from labkit.engines.base import InvalidRequest, Request
from labkit.metrics import strict_json
from labkit.serving.app_thread import AppThread
from labkit.serving.batchers import MAX_BATCH_SIZE, MAX_QUEUE, MAX_WAIT_MS
from labkit.serving.build import build_service
from labkit.serving.openai_api import (
    MAX_BODY_BYTES,
    REQUEST_ERRORS,
    APIError,
    BodyLimit,
    ChatBody,
    CompletionBody,
    ErrorsAsJSON,
    SamplingBody,
    api_error,
    error_body,
    error_response,
    http_error,
    sse,
    uses_cache,
    validation_message,
)
from labkit.serving.service import DEADLINE_S, InferenceService

DRAIN_S = 5  # seconds the requests in flight get to finish after SIGTERM, before cancellation
log = logging.getLogger(__name__)


async def _unless_gone(work, http_request):
    """``await work``, unless the client hangs up first (its connection sends
    ``http.disconnect``): then ``work`` is cancelled (and with it the request's generation) and
    the answer is a 499. Errors of the request path become their ``APIError``."""
    async def gone() -> None:
        while (await http_request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    work.add_done_callback(lambda f: f.cancelled() or f.exception())  # read, even if left
    try:
        await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is cancelling this request (shutdown)
        work.cancel()
        raise
    finally:
        watch.cancel()
    if not work.done():  # the client hung up first
        work.cancel()
        raise APIError(499, "the client closed the request", None, "client_closed")
    try:
        return work.result()
    except REQUEST_ERRORS as err:
        raise api_error(err) from None


def create_app(service: InferenceService, model_name: str | None = None, *,
               max_body_bytes: int = MAX_BODY_BYTES):
    """The FastAPI app around ``service``; ``model_name`` is the id clients must send;
    ``max_body_bytes``: larger request bodies get a 413."""
    from fastapi import FastAPI, Header
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    served = model_name or service.model_name
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await service.aclose(timeout_s=0)  # the server already gave its requests drain_s

    app = FastAPI(title="labkit inference server", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(ErrorsAsJSON)
    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_req, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()))
        return error_response(APIError(400, message, param))

    @app.exception_handler(HTTPException)
    async def _http_error(req, exc: HTTPException):
        return error_response(http_error(req.method, req.url.path, exc), exc.headers)

    @app.exception_handler(APIError)
    async def _api_error_answer(_req, exc: APIError):
        return error_response(exc)

    @app.exception_handler(InvalidRequest)
    async def _invalid(_req, exc: InvalidRequest):
        return error_response(api_error(exc))

    def check_model(name: str | None) -> None:
        if name is not None and name != served:
            raise APIError(404, f"The model '{name}' does not exist; this server serves "
                                f"'{served}'", "model", "model_not_found")

    async def run(requests: list[Request], use_cache: bool, http_request: HTTPRequest):
        """Every request's response, or the first error as an APIError (the others are then
        cancelled); a client that hangs up meanwhile cancels them all (the engine stops
        generating them)."""
        tasks = [asyncio.ensure_future(service.handle(r, use_cache=use_cache)) for r in requests]
        try:
            return await _unless_gone(asyncio.gather(*tasks), http_request)
        finally:
            for task in tasks:
                task.cancel()  # nothing for those done; the rest after an error

    def usage(responses) -> dict:
        prompt = sum(r.completion.prompt_tokens for r in responses)
        out = sum(r.completion.output_tokens for r in responses)
        return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}

    async def streamed(request: Request, kind: str, body: SamplingBody, use_cache: bool,
                       http_request: HTTPRequest):
        """An SSE response; it starts once the first text (or the answer) is there, so an error
        before the first token (400, 503, 504) is the response's status, not a stream event."""
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        head = {"id": rid, "object": obj, "created": int(time.time()), "model": served}

        def chunk(text: str | None, finish: str | None, role: bool = False) -> dict:
            if kind == "chat":
                delta = ({"role": "assistant", "content": ""} if role else
                         {} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None,
                          "finish_reason": finish}
            return {**head, "choices": [choice]}

        source = service.stream(request, use_cache=use_cache)
        try:
            first = await _unless_gone(anext(source), http_request)
        except APIError:
            await source.aclose()
            raise

        async def events():
            try:
                if kind == "chat":
                    yield sse(chunk(None, None, role=True))
                event = first
                while True:
                    if event.response is None:
                        yield sse(chunk(event.text, None))
                    else:
                        yield sse(chunk(None, event.response.finish_reason))
                        if body.stream_options and body.stream_options.include_usage:
                            yield sse({**head, "choices": [], "usage": usage([event.response])})
                        break
                    event = await anext(source)
            except REQUEST_ERRORS as err:  # headers are sent: report in-stream
                yield sse(error_body(api_error(err)))
            except Exception as exc:  # noqa: BLE001 (end the stream cleanly, keep the connection)
                log.exception("stream of %s failed", request.request_id)
                yield sse(error_body(APIError(500, f"internal error: {type(exc).__name__}: "
                                                    f"{exc}", None, "internal_error",
                                               "server_error")))
            finally:
                await source.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http_request: HTTPRequest,
                          cache_control: str | None = Header(None)):
        check_model(body.model)
        use_cache = uses_cache(cache_control)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        requests = [body.request(prompt=p) for p in prompts]
        if body.stream:
            if len(requests) != 1:
                raise APIError(400, "stream=true needs a single prompt string, got a list of "
                                    f"{len(requests)}", "prompt")
            return await streamed(requests[0], "completion", body, use_cache, http_request)
        responses = await run(requests, use_cache, http_request)
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
                "created": int(time.time()), "model": served,
                "choices": [{"index": i, "text": r.text, "logprobs": None,
                             "finish_reason": r.finish_reason} for i, r in enumerate(responses)],
                "usage": usage(responses),
                "labkit": [{"cache_hit": r.cache_hit, "latency_s": r.latency_s,
                            "ttft_s": r.ttft_s} for r in responses]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http_request: HTTPRequest,
                               cache_control: str | None = Header(None)):
        check_model(body.model)
        use_cache = uses_cache(cache_control)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        request = body.request(messages=[m.model_dump() for m in body.messages])
        if body.stream:
            return await streamed(request, "chat", body, use_cache, http_request)
        [r] = await run([request], use_cache, http_request)
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
                "created": int(time.time()), "model": served,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                             "logprobs": None, "finish_reason": r.finish_reason}],
                "usage": usage([r]),
                "labkit": {"cache_hit": r.cache_hit, "latency_s": r.latency_s,
                           "ttft_s": r.ttft_s}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served, "object": "model", "created": created,
                                            "owned_by": "labkit"}]}

    @app.get("/health")
    async def health():
        state = await service.health()
        return JSONResponse({**state, "model": served, "engine": service.engine.name},
                            status_code=503 if state["status"] == "shutting down" else 200)

    @app.get("/metrics")
    async def metrics():  # strict JSON: a statistic with no value yet is null, not NaN
        return strict_json(service.metrics())

    return app


# --- running it ------------------------------------------------------------------------------
def serve(engine: str = "auto", model: str = DEFAULT_MODEL, host: str = "127.0.0.1",
          port: int = 8000, cache: bool = True, *, redis_url: str | None = None,
          max_batch_size: int = MAX_BATCH_SIZE, max_wait_ms: float = MAX_WAIT_MS,
          max_queue: int = MAX_QUEUE, deadline_s: float | None = DEADLINE_S,
          max_body_bytes: int = MAX_BODY_BYTES, drain_s: int = DRAIN_S,
          log_level: str = "info", engine_process: bool = False, **engine_kwargs) -> None:
    """Run the OpenAI-compatible server in the foreground until Ctrl-C or SIGTERM
    (``labkit serve``); on either, requests in flight get ``drain_s`` seconds, then are
    cancelled. ``deadline_s``: a request's generation stops this long after it arrived;
    ``max_body_bytes``: larger request bodies get a 413; ``engine_process``: the engine runs
    in a process of its own (``labkit.engines.ProcessEngine``).

    Binds ``127.0.0.1`` by default: pass ``host="0.0.0.0"`` only on a trusted network, the
    server has no authentication.
    """
    import uvicorn

    service = build_service(engine, model, cache, redis_url=redis_url,
                            max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                            max_queue=max_queue, deadline_s=deadline_s,
                            engine_process=engine_process, **engine_kwargs)
    where = f" (own process, pid {service.engine.pid})" if engine_process else ""
    print(f"labkit serve: {model} on engine {service.engine.name}{where}, cache "
          f"{'on' if cache else 'off'}; OpenAI base URL http://{host}:{port}/v1", flush=True)
    try:
        uvicorn.run(create_app(service, model, max_body_bytes=max_body_bytes), host=host,
                    port=port, log_level=log_level, timeout_graceful_shutdown=drain_s)
    finally:
        service.engine.close()


class BackgroundServer(AppThread):
    """The server on a daemon thread of this process (notebooks, tests); ``stop()`` ends it.

    ``with BackgroundServer(service) as server: openai.OpenAI(base_url=server.url + "/v1")``.
    The service is closed when the server stops (requests in flight get ``drain_s`` seconds,
    then are cancelled); the engine is left to its owner.
    """

    def __init__(self, service: InferenceService, model_name: str | None = None,
                 host: str = "127.0.0.1", port: int | None = None,
                 log_level: str = "warning", *, max_body_bytes: int = MAX_BODY_BYTES,
                 drain_s: int = DRAIN_S) -> None:
        super().__init__(create_app(service, model_name, max_body_bytes=max_body_bytes), host,
                         port, log_level=log_level, lifespan="on",
                         timeout_graceful_shutdown=drain_s)
