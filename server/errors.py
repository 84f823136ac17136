"""One error envelope per dialect: ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape) on every
route but Anthropic's Messages routes, which answer ``{"type": "error", "error": {"type", "message"}}``, the shape
its SDK and Claude Code read, and Ollama's ``/api/*``, which answer ``{"error": "message"}``. :func:`error_body` is
the one place that chooses, for the exception handlers and for the middleware that answers before any route
(:func:`send_error`)."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def safe_text(text: str) -> str:
    """Text that can always be encoded: a lone surrogate (from a client's JSON ``\\ud800``) is written as its
    escape, so an error message that echoes client input never fails to encode."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# Statuses a client should retry later, and after how long (seconds) when the error does not say.
RETRY_AFTER_S = {429: 1, 503: 5}


class APIError(Exception):
    """An error the client should see, with its HTTP status."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        message = safe_text(message)
        super().__init__(message)
        self.status_code = status_code
        self.detail = ErrorDetail(message=message, type=type, param=None if param is None else safe_text(param),
                                  code=code)
        if status_code in RETRY_AFTER_S and not any(k.lower() == "retry-after" for k in headers or {}):
            headers = {**(headers or {}), "Retry-After": str(RETRY_AFTER_S[status_code])}
        self.headers = headers

    def response(self, path: str = "") -> JSONResponse:
        """The error's answer on the route at ``path`` (its dialect's envelope)."""
        return JSONResponse(error_body(self.status_code, self.detail, path), status_code=self.status_code,
                            headers=self.headers)


# Anthropic's Messages API (server/api/anthropic/): its routes, and its error types by HTTP status.
ANTHROPIC_PATH = "/v1/messages"
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}


def is_anthropic_path(path: str) -> bool:
    return path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/")


def anthropic_error_type(status: int) -> str:
    """Anthropic's ``error.type`` for an HTTP status (its SDK picks the exception class by the status)."""
    return _ANTHROPIC_TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "api_error")


# Ollama's native API (server/api/ollama/): its routes' prefix.
OLLAMA_PREFIX = "/api/"


def error_body(status: int, detail: ErrorDetail, path: str = "") -> dict[str, Any]:
    """The error envelope of the route at ``path``: Anthropic's on its Messages routes, Ollama's on ``/api/*``,
    OpenAI's everywhere else."""
    if path.startswith(OLLAMA_PREFIX):
        return {"error": detail.message}
    if is_anthropic_path(path):
        return {"type": "error", "error": {"type": anthropic_error_type(status), "message": detail.message}}
    return ErrorResponse(error=detail).model_dump()


async def send_error(send: Send, status: int, message: str, *, type: str = "invalid_request_error",
                     code: str | None = None, close: bool = False,
                     headers: list[tuple[bytes, bytes]] | None = None, path: str = "") -> None:
    """The error envelope of the route at ``path`` sent straight through ASGI, for middleware that answers
    before any route."""
    body = json.dumps(error_body(status, ErrorDetail(message=safe_text(message), type=type, code=code), path)
                      ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *(headers or [])]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def overloaded(message: str, retry_after_s: int = 1) -> APIError:
    return APIError(
        429, message, type="rate_limit_error", code="server_overloaded",
        headers={"Retry-After": str(retry_after_s)},
    )


def unavailable(message: str, *, code: str = "not_ready") -> APIError:
    return APIError(503, message, type="service_unavailable", code=code, headers={"Retry-After": "5"})


_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error"}

# OpenAPI entries for the error responses that routes can give.
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    429: {"model": ErrorResponse, "description": "All slots busy and the wait queue full; see Retry-After"},
    503: {"model": ErrorResponse, "description": "Model not loaded yet, or shutting down"},
}


# Pydantic names the branch of a union it tried ('str', 'list[int]'...) in an error's location; the client
# only needs the field's path.
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[a-z-]+\[.*\]|[A-Z]\w*)$")


def _json_error_message(exc: RequestValidationError, first: dict[str, object]) -> str:
    """Where a body that is not JSON breaks, as a line and column (the parser gives a character offset)."""
    loc = first.get("loc", ())
    pos = loc[-1] if isinstance(loc, tuple) and loc and isinstance(loc[-1], int) else None
    reason = (first.get("ctx") or {}).get("error", "invalid JSON")  # type: ignore[union-attr]
    body = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else str(exc.body or "")
    if pos is None:
        return f"the request body is not valid JSON: {reason}"
    line = body.count("\n", 0, pos) + 1
    column = pos - (body.rfind("\n", 0, pos) + 1) + 1
    return f"the request body is not valid JSON: {reason} at line {line}, column {column}"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """(message, param, code) of a request that failed validation."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return _json_error_message(exc, first), None, "invalid_json"
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _TYPE_TAG.match(str(p))]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    return (f"{param}: {msg}" if param else msg), param, "invalid_value"


def _answer(request: Request, exc: APIError) -> JSONResponse:
    """The error's response; its code is left in the request's state for the metrics and the log line."""
    request.state.error_code = exc.detail.code or exc.detail.type
    return exc.response(request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        return _answer(request, APIError(400, message, param=param, code=code))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _answer(request, APIError(
            exc.status_code, str(exc.detail), type=_HTTP_TYPES.get(exc.status_code, "invalid_request_error"),
            headers=getattr(exc, "headers", None),
        ))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, "internal server error", type="server_error").response(request.url.path)
