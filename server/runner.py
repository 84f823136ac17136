"""Running the app under uvicorn, with a drain on SIGTERM for rolling updates."""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from server.engine.core import EngineState

log = logging.getLogger(__name__)

FLUSH_GRACE_S = 0.2  # after the last request finished, time for its last bytes to leave


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM (or Ctrl-C) drains instead of closing at once.

    Draining: ``/ready`` turns 503 so the load balancer stops sending traffic, new generation requests get
    503, the requests in flight (running or queued) finish, up to ``drain_timeout_s``; then the server shuts
    down and the process exits 0. A second signal shuts down at once.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_timeout_s = drain_timeout_s
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        engine = getattr(self._app.state, "engine", None)
        if self._draining or engine is None or engine.state is not EngineState.READY:
            # Nothing to drain, or asked twice: shut down now. The signal is not re-raised (uvicorn would,
            # and the process would end with 128+SIGTERM instead of 0).
            if self._draining:
                self.force_exit = True
            self.should_exit = True
            return
        self._draining = True
        engine.draining = True
        log.info("%s: draining %d requests in flight (at most %.0f s)", signal.Signals(sig).name,
                 engine.in_flight(), self._drain_timeout_s)
        threading.Thread(target=self._drain, args=(engine,), name="drain", daemon=True).start()

    def _drain(self, engine: object) -> None:
        deadline = time.monotonic() + self._drain_timeout_s
        while engine.in_flight() and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.05)
        left = engine.in_flight()  # type: ignore[attr-defined]
        if left:
            log.warning("drain deadline reached with %d requests in flight; shutting down", left)
        else:
            log.info("drained; shutting down")
        time.sleep(FLUSH_GRACE_S)
        self.should_exit = True
