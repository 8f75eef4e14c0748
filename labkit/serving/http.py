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

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: a malformed body or
a bad field is 400 and names the field and the allowed values; an unknown model is 404 and names
the served one; overload is 503 with ``Retry-After`` (OpenAI clients retry 503 on their own).

Defaults follow OpenAI's API: ``temperature=1`` (sampled, so not cached: send
``temperature=0`` for greedy, cacheable answers), ``max_tokens=16`` for completions; chat
completions default to labkit's ``DEFAULT_MAX_TOKENS``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

from pydantic import BaseModel, Field

from labkit.config import DEFAULT_MAX_TOKENS, DEFAULT_MODEL
from labkit.engines.base import Request
from labkit.serving.batchers import (
    MAX_BATCH_SIZE,
    MAX_QUEUE,
    MAX_WAIT_MS,
    BatcherClosed,
    Overloaded,
)
from labkit.serving.build import build_service
from labkit.serving.service import InferenceService

MAX_TOKENS_LIMIT = 4096
ALLOWED = {  # what an error message says a field accepts
    "max_tokens": f"an integer in [1, {MAX_TOKENS_LIMIT}]",
    "temperature": "a number in [0, 2]",
    "top_p": "a number in (0, 1]",
    "n": "1 (one choice per request)",
    "messages": "a non-empty list of {role, content} objects",
    "prompt": "a string or a non-empty list of strings",
}


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    ignore_eos: bool = False  # vLLM's extension, for fixed-length benchmarks
    user: str | None = None

    def request(self, **kind) -> Request:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return Request(**kind, max_tokens=self.max_tokens, temperature=self.temperature,
                       top_p=self.top_p, seed=self.seed, stop=stop or None,
                       ignore_eos=self.ignore_eos, request_id=f"req-{uuid.uuid4().hex[:16]}")


class CompletionBody(_Sampling):
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_LIMIT)


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)


class APIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = \
            status, message, param, code, kind


def _error_response(err: APIError, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    body = {"error": {"message": err.message, "type": err.kind, "param": err.param,
                      "code": err.code}}
    return JSONResponse(body, status_code=err.status, headers=headers)


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One readable message for pydantic's errors: the field, what was wrong, what is allowed."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    if not loc:
        return f"the request body must be a JSON object: {first['msg']}", None
    allowed = ALLOWED.get(param)
    got = f" (got {first['input']!r})" if "input" in first and first["type"] != "missing" else ""
    msg = f"invalid '{'.'.join(loc)}': {first['msg']}{got}"
    return (msg + (f"; allowed: {allowed}" if allowed else "")), param


def _uses_cache(cache_control: str | None) -> bool:
    """False when a ``Cache-Control`` request header has ``no-cache`` or ``no-store``."""
    directives = {d.strip().lower() for d in (cache_control or "").split(",")}
    return not directives & {"no-cache", "no-store"}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def create_app(service: InferenceService, model_name: str | None = None):
    """The FastAPI app around ``service``; ``model_name`` is the id clients must send."""
    from fastapi import FastAPI, Header
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import StreamingResponse

    served = model_name or service.model_name
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await service.aclose()

    app = FastAPI(title="labkit inference server", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_req, exc: RequestValidationError):
        message, param = _validation_message(list(exc.errors()))
        return _error_response(APIError(400, message, param))

    @app.exception_handler(APIError)
    async def _api_error(_req, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return _error_response(exc, headers)

    def check_model(name: str | None) -> None:
        if name is not None and name != served:
            raise APIError(404, f"The model '{name}' does not exist; this server serves "
                                f"'{served}'", "model", "model_not_found")

    async def run(request: Request, use_cache: bool):
        try:
            return await service.handle(request, use_cache=use_cache)
        except Overloaded as err:
            raise APIError(503, str(err), None, "overloaded", "server_overloaded") from None
        except BatcherClosed as err:
            raise APIError(503, str(err), None, "shutting_down", "server_unavailable") from None

    def usage(responses) -> dict:
        prompt = sum(r.completion.prompt_tokens for r in responses)
        out = sum(r.completion.output_tokens for r in responses)
        return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}

    def streamed(request: Request, kind: str, body: _Sampling, use_cache: bool):
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

        async def events():
            try:
                if kind == "chat":
                    yield _sse(chunk(None, None, role=True))
                async for event in service.stream(request, use_cache=use_cache):
                    if event.response is None:
                        yield _sse(chunk(event.text, None))
                    else:
                        yield _sse(chunk(None, event.response.finish_reason))
                        if body.stream_options and body.stream_options.include_usage:
                            yield _sse({**head, "choices": [], "usage": usage([event.response])})
            except (Overloaded, BatcherClosed) as err:  # headers are sent: report in-stream
                yield _sse({"error": {"message": str(err), "type": "server_overloaded",
                                      "param": None, "code": "overloaded"}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, cache_control: str | None = Header(None)):
        check_model(body.model)
        use_cache = _uses_cache(cache_control)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        requests = [body.request(prompt=p) for p in prompts]
        if body.stream:
            if len(requests) != 1:
                raise APIError(400, "stream=true needs a single prompt string, got a list of "
                                    f"{len(requests)}", "prompt")
            return streamed(requests[0], "completion", body, use_cache)
        responses = await asyncio.gather(*(run(r, use_cache) for r in requests))
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
                "created": int(time.time()), "model": served,
                "choices": [{"index": i, "text": r.text, "logprobs": None,
                             "finish_reason": r.finish_reason} for i, r in enumerate(responses)],
                "usage": usage(responses),
                "labkit": [{"cache_hit": r.cache_hit, "latency_s": r.latency_s,
                            "ttft_s": r.ttft_s} for r in responses]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, cache_control: str | None = Header(None)):
        check_model(body.model)
        use_cache = _uses_cache(cache_control)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        request = body.request(messages=[m.model_dump() for m in body.messages])
        if body.stream:
            return streamed(request, "chat", body, use_cache)
        r = await run(request, use_cache)
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
        return {"status": "ok", "model": served, "engine": service.engine.name}

    @app.get("/metrics")
    async def metrics():
        return service.metrics()

    return app


# --- running it ------------------------------------------------------------------------------
def serve(engine: str = "auto", model: str = DEFAULT_MODEL, host: str = "127.0.0.1",
          port: int = 8000, cache: bool = True, *, redis_url: str | None = None,
          max_batch_size: int = MAX_BATCH_SIZE, max_wait_ms: float = MAX_WAIT_MS,
          max_queue: int = MAX_QUEUE, log_level: str = "info", **engine_kwargs) -> None:
    """Run the OpenAI-compatible server in the foreground until Ctrl-C (``labkit serve``).

    Binds ``127.0.0.1`` by default: pass ``host="0.0.0.0"`` only on a trusted network, the
    server has no authentication.
    """
    import uvicorn

    service = build_service(engine, model, cache, redis_url=redis_url,
                            max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                            max_queue=max_queue, **engine_kwargs)
    print(f"labkit serve: {model} on engine {service.engine.name}, cache "
          f"{'on' if cache else 'off'}; OpenAI base URL http://{host}:{port}/v1", flush=True)
    try:
        uvicorn.run(create_app(service, model), host=host, port=port, log_level=log_level)
    finally:
        service.engine.close()


class BackgroundServer:
    """The server on a daemon thread of this process (notebooks, tests); ``stop()`` ends it.

    ``with BackgroundServer(service) as server: openai.OpenAI(base_url=server.url + "/v1")``.
    The service is closed when the server stops; the engine is left to its owner.
    """

    def __init__(self, service: InferenceService, model_name: str | None = None,
                 host: str = "127.0.0.1", port: int | None = None,
                 log_level: str = "warning") -> None:
        import uvicorn

        from labkit.serving.redis_server import free_port

        self.host, self.port = host, port or free_port()
        config = uvicorn.Config(create_app(service, model_name), host=host, port=self.port,
                                log_level=log_level, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True,
                                        name=f"labkit-http-{self.port}")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.url} within "
                                   f"{timeout_s} s (port in use?)")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
