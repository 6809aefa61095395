"""The HTTP plumbing of /v1: errors in OpenAI's shape, the key and rate checks, bodies read within a limit,
and streams that close their generation however the response ends."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Iterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from backend.errors import (
    BackendError,
    BadImage,
    ContextOverflow,
    InvalidSettings,
    ModelNotReady,
    RateLimited,
    ServerBusy,
    UserError,
)
from backend.openai_server.schema import PARAM_NAMES, ApiError

log = logging.getLogger(__name__)

END = object()
# Typed user errors -> (HTTP status, OpenAI-style code). The first match wins.
STATUSES: tuple[tuple[type[UserError], int, str | None], ...] = (
    (RateLimited, 429, "rate_limit_exceeded"),
    (ServerBusy, 429, "server_busy"),
    (ModelNotReady, 503, "model_not_ready"),
    (ContextOverflow, 400, "context_length_exceeded"),
    (InvalidSettings, 400, "invalid_setting"),
    (BadImage, 400, "invalid_image"),
    (UserError, 400, None),
)


def api_error(error: Exception) -> ApiError:
    """Any exception as the error a client sees; unexpected ones are logged with their traceback."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, BackendError):  # remote mode: the server behind us failed
        return ApiError(502, str(error), code="backend_error")
    for kind, status, code in STATUSES:
        if isinstance(error, kind):
            field_name = getattr(error, "field", None)
            refused = ApiError(status, str(error), PARAM_NAMES.get(field_name, field_name), code)
            refused.retry_after = getattr(error, "retry_after", 1)
            log.warning("Refused a /v1 request (%s): %s", type(error).__name__, error)
            return refused
    log.error("API request failed", exc_info=error)
    return ApiError(500, f"Generation failed ({type(error).__name__}: {error}).")


def error_response(error: ApiError) -> JSONResponse:
    retry = {"Retry-After": str(getattr(error, "retry_after", 1))} if error.status in (429, 503) else None
    return JSONResponse(error.body(), status_code=error.status, headers=retry)


class OpenAIRoute(APIRoute):
    """Every failure, auth included, leaves as OpenAI's error JSON with its status."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as error:
                return error_response(api_error(error))

        return handle


def key_check(api_key: str | None) -> Callable:
    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(
                401,
                "Missing or wrong API key: send it as 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )

    return require_key


def rate_check(rate_limit) -> Callable:
    """A dependency: the request counts against its client's --rate-limit (a ClientRateLimit, or None)."""

    async def within_rate_limit(request: Request) -> None:
        if rate_limit is not None:
            rate_limit.admit(request)

    return within_rate_limit


class ClosingStreamingResponse(StreamingResponse):
    """Close the event generator (and with it the generation) however the response ends."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def next_item(items: Iterator):
    """One step in a worker thread; a cancelled request waits for the step, then closes the stream."""
    return await run_in_threadpool(next, items, END)


async def read_json(request: Request, limit: int):
    """The body as JSON; a body over `limit` bytes is drained, not stored, and refused with 413."""
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        too_big = too_big or size > limit
        if too_big and size > 8 * limit:
            break  # stop draining an absurd body; the connection is closed after the answer
        if not too_big:
            chunks.append(chunk)
    if too_big:
        raise ApiError(413, f"The request body is over the {limit / 2**20:.1f} MiB this server accepts.")
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(400, f"The request body is not valid JSON ({error}).") from None
