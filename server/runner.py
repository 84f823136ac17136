"""Running the app under uvicorn, with a drain on SIGTERM for rolling updates."""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from server.engine.core import Engine, EngineState
from server.http_guard import GuardedHttpToolsProtocol, HttpLimits
from server.settings import Settings

log = logging.getLogger(__name__)

FLUSH_GRACE_S = 0.2  # after the last request finished, time for its last bytes to leave
ENGINE_STOP_TIMEOUT_S = 10.0  # a decode step in progress finishes first


def harden(config: uvicorn.Config, settings: Settings) -> None:
    """HTTP limits on uvicorn's config: header size and read deadlines (httptools behind a guard, see
    server/http_guard.py), and a cap on open connections."""
    limits = HttpLimits(max_header_bytes=settings.max_header_bytes, header_timeout_s=settings.header_timeout_s,
                        body_timeout_s=settings.body_timeout_s, write_timeout_s=settings.write_timeout_s)
    config.http = functools.partial(GuardedHttpToolsProtocol, limits=limits)  # type: ignore[assignment]
    config.limit_concurrency = settings.limit_concurrency


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM (or Ctrl-C) drains instead of closing at once.

    Draining: ``/ready`` turns 503 so the load balancer stops sending traffic, new generation requests get
    503, the requests in flight (running or queued) finish, up to ``drain_timeout_s``; then the server shuts
    down and the process exits 0. At the deadline, or on a second signal, the requests still in flight end
    with 503 ``shutting_down`` (an ``error`` event on streams) before the server closes; a third signal
    exits at once.

    The HTTP limits of ``app.state.settings`` (see :func:`harden`) are applied to ``config``.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        settings = getattr(app.state, "settings", None)
        if isinstance(settings, Settings):
            harden(config, settings)
        super().__init__(config)
        self._app = app
        self._drain_timeout_s = drain_timeout_s
        self._draining = False
        self._cutting = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        engine = getattr(self._app.state, "engine", None)
        if self._cutting:
            self.force_exit = True
            self.should_exit = True
            return
        if self._draining:
            self._cutting = True
            log.warning("%s again: ending %d requests in flight now", signal.Signals(sig).name, engine.in_flight())
            threading.Thread(target=self._cut, args=(engine,), name="cut", daemon=True).start()
            return
        if engine is None or engine.state is not EngineState.READY:
            # Nothing to drain: shut down now. The signal is not re-raised (uvicorn would, and the process
            # would end with 128+SIGTERM instead of 0).
            self.should_exit = True
            return
        self._draining = True
        engine.draining = True
        log.info("%s: draining %d requests in flight (at most %.0f s)", signal.Signals(sig).name,
                 engine.in_flight(), self._drain_timeout_s)
        threading.Thread(target=self._drain, args=(engine,), name="drain", daemon=True).start()

    def _drain(self, engine: Engine) -> None:
        deadline = time.monotonic() + self._drain_timeout_s
        while engine.in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._cutting:
            return
        left = engine.in_flight()
        if left:
            log.warning("drain deadline reached with %d requests in flight; ending them with 503", left)
            self._cut(engine)
            return
        log.info("drained; shutting down")
        time.sleep(FLUSH_GRACE_S)
        self.should_exit = True

    def _cut(self, engine: Engine) -> None:
        """End every request in flight with 503 shutting_down (the engine fails them as it stops), let those
        answers leave, then shut down."""
        self._cutting = True
        engine.stop(ENGINE_STOP_TIMEOUT_S)
        time.sleep(FLUSH_GRACE_S)
        self.should_exit = True
