"""Shared fixtures: the real embedded model, a real server on loopback, and an in-process app."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.model_files import embedded_model_path
from server.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def model_path() -> Path:
    return embedded_model_path()


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(tmp: Path, *args: str, env: dict[str, str] | None = None, wait_ready: bool = True) -> LiveServer:
    """Run ``llama-inference serve`` in a subprocess on a free loopback port."""
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    full_env = {**os.environ, **(env or {})}
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
            stdout=log_file, stderr=subprocess.STDOUT, env=full_env, cwd=REPO,
        )
    server = LiveServer(url=f"http://127.0.0.1:{port}", process=proc, log_path=log_path)
    if wait_ready:
        wait_until_ready(server)
    return server


def wait_until_ready(server: LiveServer, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/ready", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after {timeout}s:\n{server.log()}")


def stop_server(server: LiveServer, timeout: float = 20.0) -> int:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One real server for the session: 4 slots, the embedded model."""
    server = start_server(tmp_path_factory.mktemp("live"), "--parallel", "4", "--queue-size", "4")
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def http(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, timeout=60.0) as client:
        yield client


@pytest.fixture
def make_client() -> Iterator[Callable[..., TestClient]]:
    """In-process app through Starlette's TestClient (lifespan included), waiting for the model to load."""
    clients: list[TestClient] = []

    def make(wait_ready: bool = True, **settings: object) -> TestClient:
        client = TestClient(create_app(Settings(**settings)))  # type: ignore[arg-type]
        client.__enter__()
        clients.append(client)
        if wait_ready:
            client.app.state.engine.loaded.wait(60)  # type: ignore[attr-defined]
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
