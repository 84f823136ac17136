"""Graceful rollout: SIGTERM lets streams in flight finish, refuses new work with 503, and exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import start_server, stop_server


def test_sigterm_drains_streams_refuses_new_requests_and_exits_zero(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--drain-timeout-s", "60")
    events: list[tuple[str, dict[str, object]]] = []
    started = threading.Event()

    def stream() -> None:
        body = {"prompt": "Tell me a story.", "max_length": 300, "ignore_eos": True, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", server.url + "/generate", json=body, timeout=120) as resp:
            kind = ""
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    events.append((kind, json.loads(line[5:])))
                    if len(events) == 5:
                        started.set()

    try:
        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(server.url + "/ready", timeout=10)
        assert ready.status_code == 503 and "shutting down" in ready.json()["error"]["message"]
        assert ready.json()["error"]["code"] == "draining"
        refused = httpx.post(server.url + "/generate", json={"prompt": "hi", "max_length": 4}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
        reader.join(120)
        start = time.monotonic()
        code = server.process.wait(30)
        assert time.monotonic() - start < 30
    finally:
        stop_server(server)
    assert code == 0, server.log()
    assert events[-1][0] == "done", f"{len(events)} events; server log:\n{server.log()}"
    done = events[-1][1]
    assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 300  # type: ignore[index]
    assert "draining 1 requests in flight" in server.log()


def test_sigterm_when_idle_exits_zero_at_once(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        server.process.send_signal(signal.SIGTERM)
        start = time.monotonic()
        code = server.process.wait(30)
        assert time.monotonic() - start < 10
    finally:
        stop_server(server)
    assert code == 0
