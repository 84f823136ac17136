"""HTTP/1.1 limits that uvicorn's httptools protocol lacks: a header size limit and read deadlines.

httptools grows the URL and each header value by appending as bytes arrive, with no limit: one 128 MiB header
costs 14 s of event-loop CPU, before any route (or API key check) runs. This protocol counts the bytes of a
request's line and headers before the parser sees them, and answers 431 once they pass ``max_header_bytes``.
A connection whose request line and headers do not arrive within ``header_timeout_s`` (of opening, or of the
previous answer ending) gets 408 and is closed; a body that does not arrive within ``body_timeout_s`` of its
headers is cut off. Slow clients (slowloris) therefore hold a connection for a bounded time. So do clients that
stop reading: a connection whose writes stay blocked (the client's window full) for ``write_timeout_s`` is
aborted, which ends its stream and frees its slot. Past ``limit_concurrency`` the probes (``/health``, ``/ready``,
``/metrics``) are still answered, so a crowd of hung clients does not make the liveness probe restart the pod.

Why not uvicorn's h11 protocol, which has a header limit: it frames every streamed event in Python, and the
server streams tokens hot (see benchmarks/RESULTS.md); the guard keeps httptools' C framing and adds a few
comparisons per received chunk.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from server.security import PROBE_PATHS  # answered even past limit_concurrency: what keeps the pod alive

log = logging.getLogger(__name__)

LINGER_S = 0.5  # after a refusal, how long the rest of the client's bytes are dropped before the socket closes


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    write_timeout_s: float


def _envelope(message: str, type_: str, code: str) -> bytes:
    """The server's error envelope (server/errors.py), for answers given before the app runs."""
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


def _response(status: int, reason: str, message: str, code: str) -> bytes:
    body = _envelope(message, "invalid_request_error", code)
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


async def _over_capacity(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """uvicorn's answer past ``limit_concurrency``, in the server's error envelope instead of plain text."""
    body = _envelope("the server has too many connections open; retry shortly", "service_unavailable",
                     "over_capacity")
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"5"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header size limit and header/body read deadlines, and its
    over-capacity 503 (``limit_concurrency``) answered in the server's JSON error envelope."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, limits: HttpLimits) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self._in_head = True  # reading a request line and headers (or waiting for the next request)
        self._head_bytes = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._write_deadline: asyncio.TimerHandle | None = None
        self._refused = False

    # ---- deadlines ----

    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _busy(self) -> bool:
        """A response is being produced on this connection."""
        return self.cycle is not None and not self.cycle.response_complete

    def _refuse(self, status: int, reason: str, message: str, code: str) -> None:
        """Answer (when no response is under way) and close the connection.

        The answer is followed by a FIN, and what the client still sends is read and dropped for a moment
        before the socket closes: closing with unread bytes would send a reset, which can destroy the answer
        before the client reads it."""
        self._disarm()
        if self.transport.is_closing() or self._refused:
            return
        self._refused = True
        if self._busy():
            self.transport.close()
            self._arm_write_if_unsent()
            return
        self.transport.write(_response(status, reason, message, code))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)
        self._arm_write_if_unsent()

    def _head_timed_out(self) -> None:
        self._deadline = None
        if self._busy():
            return
        log.info("closing a connection whose request headers did not arrive within %g s", self.limits.header_timeout_s)
        self._refuse(408, "Request Timeout", f"request headers not received within {self.limits.header_timeout_s:g} s",
                     "request_timeout")

    def _body_timed_out(self) -> None:
        self._deadline = None
        log.info("closing a connection whose request body did not arrive within %g s", self.limits.body_timeout_s)
        self._refuse(408, "Request Timeout", f"request body not received within {self.limits.body_timeout_s:g} s",
                     "request_timeout")

    # ---- protocol ----

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._disarm_write()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The client stopped taking bytes: it has ``write_timeout_s`` to take some again."""
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(self.limits.write_timeout_s, self._write_timed_out)

    def resume_writing(self) -> None:
        self._disarm_write()
        super().resume_writing()

    def _disarm_write(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _write_timed_out(self) -> None:
        self._write_deadline = None
        if self.transport.get_write_buffer_size() == 0:  # it drained without a pause: nothing is stuck
            return
        log.info("aborting a connection whose client read nothing for %g s", self.limits.write_timeout_s)
        self.transport.abort()

    def _arm_write_if_unsent(self) -> None:
        """Bytes still unsent below the pause mark get the same deadline: closing waits for them to leave, and a
        client that never reads would hold the connection (and its place in LIMIT_CONCURRENCY) for ever."""
        if self._write_deadline is None and self.transport.get_write_buffer_size() > 0:
            self._write_deadline = self.loop.call_later(self.limits.write_timeout_s, self._write_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head and self.parser is not None:
            room = self.limits.max_header_bytes - self._head_bytes
            if len(data) > room:
                # Feed only what the limit allows; if that does not finish the headers, refuse.
                self._head_bytes += room
                super().data_received(data[:room])
                if self._refused or self.transport.is_closing():
                    return
                if self._in_head:
                    log.info("refusing a request whose line and headers pass %d bytes", self.limits.max_header_bytes)
                    self._refuse(431, "Request Header Fields Too Large",
                                 f"request line and headers larger than {self.limits.max_header_bytes} bytes",
                                 "headers_too_large")
                    return
                self.data_received(data[room:])
                return
            self._head_bytes += len(data)
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._arm(self.limits.body_timeout_s, self._body_timed_out)
        super().on_headers_complete()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        if app is service_unavailable:
            app = self.app if cycle.scope["path"] in PROBE_PATHS else _over_capacity
        super()._start_asgi_task(cycle, app)

    def on_message_complete(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_write_if_unsent()
        if not self.transport.is_closing() and not self._busy() and self._in_head:
            self._arm(self.limits.header_timeout_s, self._head_timed_out)
