"""One log line per request: id, route, status, tokens and timings (JSON fields with LOG_JSON=true).

Prompts are logged only when LOG_PROMPTS is on; API keys never (the line has no headers)."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("llama_inference.requests")
QUIET_PATHS = {"/health", "/ready", "/metrics"}


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
            level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
            if log.isEnabledFor(level):
                summary = " ".join(f"{k}={v}" for k, v in fields.items() if k != "prompt")
                log.log(level, "%s", summary, extra={"fields": fields})
