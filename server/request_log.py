"""One log line per request: id, route, status, tokens and timings (JSON fields with LOG_JSON=true).

Prompts are logged only when LOG_PROMPTS is on; API keys never (the line has no headers)."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("llama_inference.requests")
QUIET_PATHS = {"/health", "/ready", "/metrics"}

# Control characters (a percent-decoded %0a in a path would otherwise start a forged log line), line and
# paragraph separators, and lone surrogates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff\\\\]")


def escape(value: object) -> str:
    """A log field's text with control characters, separators, surrogates and backslashes escaped."""
    return _UNSAFE.sub(lambda m: "\\\\" if m[0] == "\\" else f"\\u{ord(m[0]):04x}", str(value))


class RequestLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0
        state: dict[str, Any] = scope.setdefault("state", {})

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            fields: dict[str, Any] = {
                "method": scope["method"], "path": scope["path"], "status": status or 499,
                "duration_ms": round((time.perf_counter() - start) * 1000, 1),
                **state.get("generation", {}),
            }
            if (status or 499) >= 400:
                # A refused request has no generation id yet: give it one, and the error code it was answered.
                fields.setdefault("id", f"req-{uuid.uuid4().hex[:24]}")
                fields.setdefault("error", state.get("error_code", "-"))
            level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
            if log.isEnabledFor(level):
                summary = " ".join(f"{k}={escape(v)}" for k, v in fields.items() if k != "prompt")
                log.log(level, "%s", summary, extra={"fields": fields})
