"""OpenAI's wire format for ``labkit.serving.http``: the request bodies, the error object and
which error gets which status (``api_error``, ``http_error``), SSE framing (``sse``) and the
``Cache-Control`` rule (``uses_cache``).

Bodies are pydantic models with strict types, as OpenAI's API checks them ("Invalid type for
'max_tokens': expected an integer"): ``max_tokens: true`` or ``"16"`` is a 400, not 1 or 16;
numbers must be finite (``temperature: NaN`` is refused as not finite, not as "above 2"); a
``seed`` is a 64-bit integer (vLLM's bound); text must be valid Unicode (a lone surrogate such as
``"\\ud800"`` is valid JSON but cannot be tokenized); an empty prompt and an empty stop string are
refused, as vLLM refuses them (an empty stop string would match at once and empty every answer).

Every error is ``{"error": {"message", "type", "param", "code"}}`` (``error_body``); the
middlewares here make sure that holds for what never reaches a route too:

- ``BodyLimit``: a body over ``max_body_bytes`` is a 413 before it is read to the end
  (Starlette's own limit answers in plain text);
- ``ErrorsAsJSON``: an unexpected exception is a 500 in that format, answered so that the
  connection stays usable for the client's next request (Starlette's own 500 re-raises, and
  uvicorn then closes the keep-alive connection under the next request).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from labkit.config import DEFAULT_MAX_TOKENS, MAX_BODY_BYTES
from labkit.engines.base import SEED_RANGE, InvalidRequest, Request, unicode_text
from labkit.serving.batchers import BatcherClosed, Overloaded
from labkit.serving.service import DeadlineExceeded

log = logging.getLogger(__name__)

MAX_TOKENS_LIMIT = 4096
ALLOWED = {  # what an error message says a field accepts
    "max_tokens": f"an integer in [1, {MAX_TOKENS_LIMIT}]",
    "max_completion_tokens": f"an integer in [1, {MAX_TOKENS_LIMIT}]",
    "temperature": "a number in [0, 2]",
    "top_p": "a number in (0, 1]",
    "seed": "an integer in [-2**63, 2**63 - 1]",
    "n": "1 (one choice per request)",
    "messages": "a non-empty list of {role, content} objects",
    "prompt": "a non-empty string or a non-empty list of non-empty strings",
    "stop": "a non-empty string or a list of non-empty strings",
    "stream": "true or false",
    "ignore_eos": "true or false",
}

TokenCount = Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS_LIMIT)]
Seed = Annotated[int, Field(strict=True, ge=SEED_RANGE[0], le=SEED_RANGE[1])]


def _text(value: str, param: str) -> str:
    """``value`` if it is valid Unicode, else a validation error naming ``param``."""
    try:
        return unicode_text(value, param)
    except InvalidRequest as err:
        raise PydanticCustomError("invalid_text", str(err)) from None


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Annotated[str, Field(strict=True)]

    @field_validator("content")
    @classmethod
    def _unicode(cls, value: str) -> str:
        return _text(value, "content")


class StreamOptions(BaseModel):
    include_usage: Annotated[bool, Field(strict=True)] = False


class SamplingBody(BaseModel):
    """The fields completions and chat completions share."""

    model: str | None = None
    temperature: Annotated[float, Field(strict=True, ge=0.0, le=2.0, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(strict=True, gt=0.0, le=1.0, allow_inf_nan=False)] = 1.0
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: Annotated[bool, Field(strict=True)] = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(strict=True, ge=1, le=1)] = 1
    ignore_eos: Annotated[bool, Field(strict=True)] = False  # vLLM's: fixed-length benchmarks
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        for s in [value] if isinstance(value, str) else value or ():
            if not s:
                raise PydanticCustomError("empty_stop", "stop strings must not be empty")
            _text(s, "stop")
        return value

    def request(self, **kind) -> Request:
        """The engine ``Request`` for this body (``prompt=`` or ``messages=``)."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return Request(**kind, max_tokens=self.max_tokens, temperature=self.temperature,
                       top_p=self.top_p, seed=self.seed, stop=stop or None,
                       ignore_eos=self.ignore_eos, request_id=f"req-{uuid.uuid4().hex[:16]}")


class CompletionBody(SamplingBody):
    prompt: str | list[Annotated[str, Field(strict=True)]]
    max_tokens: TokenCount = 16

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str]) -> str | list[str]:
        prompts = [value] if isinstance(value, str) else value
        if not prompts or not all(prompts):
            raise PydanticCustomError("empty_prompt", "the prompt must not be empty")
        for p in prompts:
            _text(p, "prompt")
        return value


class ChatBody(SamplingBody):
    messages: list[Message] = Field(min_length=1)
    max_tokens: TokenCount = DEFAULT_MAX_TOKENS
    max_completion_tokens: TokenCount | None = None


class APIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = \
            status, message, param, code, kind


def error_body(err: APIError) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": err.message, "type": err.kind, "param": err.param,
                      "code": err.code}}


def error_response(err: APIError, headers: dict | None = None):
    """``err`` as a JSON response with its status (503 adds ``Retry-After: 1``)."""
    from fastapi.responses import JSONResponse

    if err.status == 503:
        headers = {"Retry-After": "1", **(headers or {})}
    return JSONResponse(error_body(err), status_code=err.status, headers=headers)


REQUEST_ERRORS = (InvalidRequest, Overloaded, BatcherClosed, DeadlineExceeded)


def api_error(err: InvalidRequest | Overloaded | BatcherClosed | DeadlineExceeded) -> APIError:
    """The HTTP answer to an error of the request path (one of ``REQUEST_ERRORS``)."""
    if isinstance(err, InvalidRequest):
        return APIError(400, str(err), err.param, err.code)
    if isinstance(err, Overloaded):
        return APIError(503, str(err), None, "overloaded", "server_overloaded")
    if isinstance(err, BatcherClosed):
        return APIError(503, str(err), None, "shutting_down", "server_unavailable")
    return APIError(504, str(err), None, "deadline_exceeded", "timeout_error")


def http_error(method: str, path: str, exc: HTTPException) -> APIError:
    """Starlette's HTTP errors (no such route, wrong method, undecodable body, too large) in
    OpenAI's words: ``Invalid URL (POST /v1/nope)`` is what OpenAI answers for a bad route."""
    route = f"{method} {path}"
    message = {404: f"Invalid URL ({route})",
               405: f"Method Not Allowed ({route}); allowed: "
                    f"{(exc.headers or {}).get('Allow', '?')}",
               400: f"malformed request body ({exc.detail}): send a UTF-8 JSON object",
               }.get(exc.status_code, str(exc.detail))
    code = "request_too_large" if exc.status_code == 413 else None
    return APIError(exc.status_code, message, None, code)


def uses_cache(cache_control: str | None) -> bool:
    """False when a ``Cache-Control`` request header has ``no-cache`` or ``no-store``."""
    directives = {d.strip().lower() for d in (cache_control or "").split(",")}
    return not directives & {"no-cache", "no-store"}


def sse(obj) -> str:
    """One Server-Sent Event carrying ``obj`` as compact JSON: ``data: {...}\\n\\n``."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One readable message for pydantic's errors: the field, what was wrong, what is allowed."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    if not loc:
        return f"the request body must be a JSON object: {first['msg']}", None
    allowed = ALLOWED.get(param)
    shown = repr(first["input"])[:80] if "input" in first else ""
    got = f" (got {shown})" if shown and first["type"] != "missing" else ""
    msg = f"invalid '{'.'.join(loc)}': {first['msg']}{got}"
    return (msg + (f"; allowed: {allowed}" if allowed else "")), param


async def _send_error(scope, send, err: APIError, headers: dict | None = None) -> None:
    """Answer an ASGI request with ``err`` (for middlewares, which have no route)."""
    await error_response(err, headers)(scope, None, send)


class BodyTooLarge(HTTPException):
    """A request body over the server's limit (413): an ``HTTPException``, so that FastAPI's
    body reader passes it on instead of calling it a parse error."""

    def __init__(self, detail: str, max_body_bytes: int) -> None:
        super().__init__(413, f"request body too large ({detail}); this server accepts at most "
                              f"{max_body_bytes} bytes: send a shorter prompt")


class BodyLimit:
    """ASGI middleware: a request body over ``max_body_bytes`` is a 413 (OpenAI's format),
    from its ``Content-Length`` before anything is read, or as soon as a body sent without one
    has grown past the limit."""

    def __init__(self, app, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes!r}")
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", ())).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            # Answered before the body is read; uvicorn skips the unread body, so the
            # connection stays usable for the client's next request.
            err = BodyTooLarge(f"Content-Length {int(length)}", self.max_body_bytes)
            return await _send_error(scope, send, APIError(413, err.detail, None,
                                                           "request_too_large"))
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise BodyTooLarge(f"over {self.max_body_bytes} bytes sent", self.max_body_bytes)
            return message

        await self.app(scope, counted, send)


class ErrorsAsJSON:
    """ASGI middleware: an exception that escaped the app is logged and answered 500 in
    OpenAI's format, and not re-raised, so uvicorn keeps the connection open for the next
    request. (Once a response has started, only its log line is left to give.)"""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:  # noqa: BLE001 (the point: nothing escapes to the server)
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if not started:
                err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", None,
                               "internal_error", "server_error")
                await _send_error(scope, send, err)
