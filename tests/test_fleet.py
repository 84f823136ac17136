"""Three replicas behind the real vllm-router (PyPI), on loopback: conversations stay on the replica holding
their cache, the load spreads, and the routes the router calls (vLLM's /tokenize, /get_load, SGLang's /generate
shape) answer as it expects. Loads are bounded: five conversations of four short turns."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, free_port, start_server, stop_server

ROUTER = Path(sys.executable).parent / "vllm-router"
pytestmark = pytest.mark.skipif(not ROUTER.exists() and shutil.which("vllm-router") is None,
                                reason="vllm-router is not installed (the test extra pins it)")

SYSTEM = ("You are the help desk of a small public library. Answer in one short, friendly sentence. The library "
          "opens at nine, closes at six, lends books for three weeks and has a reading room on the first floor. ")
QUESTIONS = ["When do you open?", "How long can I keep a book?", "Where can I read quietly?", "Thanks, bye!"]
# The router's health checks on our readiness (a draining replica leaves at once), every 2 s, as the vllm-router
# overlay sets them (k8s/overlays/vllm-router).
HEALTH = ["--health-check-endpoint", "/ready", "--health-check-interval-secs", "2", "--health-failure-threshold", "2",
          "--health-check-timeout-secs", "2"]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LiveServer]]:
    tmp = tmp_path_factory.mktemp("fleet")
    servers = [start_server(tmp, "--n-threads", "1", "--parallel", "2", "--ctx-size", "4096", "--queue-size", "8",
                            wait_ready=False) for _ in range(3)]
    try:
        from tests.conftest import wait_until_ready

        for s in servers:
            wait_until_ready(s)
        yield servers
    finally:
        for s in servers:
            stop_server(s)


def _router(replicas: list[LiveServer], policy: str, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([str(ROUTER), "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
                             "--worker-urls", *[r.url for r in replicas], *HEALTH, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readiness", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("vllm-router did not become ready")


def _served(replica: LiveServer) -> int:
    return replica.log().count("path=/v1/chat/completions status=200")


@dataclass
class Fleet:
    cached_share: list[float] = field(default_factory=list)  # of each later turn's history
    errors: list[str] = field(default_factory=list)


def _conversations(url: str, session_header: bool) -> Fleet:
    fleet = Fleet()

    def converse(n: int) -> None:
        history = [{"role": "system", "content": SYSTEM}]
        with httpx.Client(base_url=url, timeout=120) as client:
            for turn, question in enumerate(QUESTIONS):
                history.append({"role": "user", "content": f"(visitor {n}) {question}"})
                headers = {"X-Session-ID": f"conversation-{n}"} if session_header else {}
                resp = client.post("/v1/chat/completions", headers=headers, json={
                    "model": "m", "messages": history, "max_tokens": 12, "temperature": 0, "user": f"visitor-{n}"})
                if resp.status_code != 200:
                    fleet.errors.append(f"{resp.status_code} {resp.text[:200]}")
                    return
                answer = resp.json()
                history.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
                if turn:
                    usage = answer["usage"]
                    previous = usage["prompt_tokens"] - 24  # about this turn's own new tokens
                    fleet.cached_share.append(min(1.0, usage["prompt_tokens_details"]["cached_tokens"] / previous))

    threads = [threading.Thread(target=converse, args=(n,)) for n in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return fleet


@pytest.mark.parametrize(("policy", "extra", "session_header"), [
    ("sticky_least_loaded", [], True),
    # cache_aware balances only past these loads: with the defaults (64 requests apart) every request of equal
    # load goes to the replica that matched the shared system prompt first.
    ("cache_aware", ["--balance-abs-threshold", "1", "--balance-rel-threshold", "1.0", "--cache-threshold", "0.5"],
     False),
], ids=["sticky_least_loaded", "cache_aware"])
def test_conversations_keep_their_cache_and_the_load_spreads(replicas: list[LiveServer], policy: str,
                                                             extra: list[str], session_header: bool) -> None:
    before = [_served(r) for r in replicas]
    proc, url = _router(replicas, policy, *extra)
    try:
        fleet = _conversations(url, session_header)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert not fleet.errors, fleet.errors
    shares = [_served(r) - b for r, b in zip(replicas, before, strict=True)]
    assert sum(shares) == 20
    assert sum(fleet.cached_share) / len(fleet.cached_share) >= 0.9, fleet.cached_share
    assert max(shares) / sum(shares) <= 0.5 + 1e-9, f"one replica took {shares}"


def test_the_routes_the_router_calls_answer_in_its_shapes(replicas: list[LiveServer]) -> None:
    worker = replicas[0].url
    tokens = httpx.post(worker + "/tokenize", json={"model": "m", "prompt": "Hello world"}, timeout=30).json()
    assert tokens["count"] == len(tokens["tokens"]) >= 2 and tokens["max_model_len"] == 2048
    chat = httpx.post(worker + "/tokenize", json={"model": "m", "messages": [{"role": "user", "content": "Hi"}]},
                      timeout=30).json()
    rendered = httpx.post(worker + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                                 "max_tokens": 1}, timeout=30).json()
    assert chat["count"] == rendered["usage"]["prompt_tokens"]  # the same rendering as the chat route
    plain = httpx.post(worker + "/tokenize", json={"model": "m", "prompt": "Hello world", "add_special_tokens": False},
                       timeout=30).json()
    assert httpx.post(worker + "/tokenize", json={"content": "Hello world"}, timeout=30).json()["tokens"] == (
        plain["tokens"])  # llama-server's shape, beside vLLM's
    assert httpx.get(worker + "/get_load", timeout=10).json() == {"load": 0}


def test_generate_through_the_router_honours_its_fields(replicas: list[LiveServer]) -> None:
    proc, url = _router(replicas, "round_robin")
    try:
        # The router rewrites /generate into SGLang's shape: its sampling_params are what reach the replica.
        routed = httpx.post(url + "/generate", json={"prompt": "Once upon a time", "sampling_params": {
            "max_new_tokens": 7, "temperature": 0, "ignore_eos": True}}, timeout=60)
        assert routed.status_code == 200, routed.text
        assert routed.json()["usage"]["completion_tokens"] == 7
        # The seed's fields pass through untouched on /native/generate.
        seed = httpx.post(url + "/native/generate", json={"prompt": "Once upon a time", "max_length": 5,
                                                          "temperature": 0, "ignore_eos": True}, timeout=60)
        assert seed.status_code == 200, seed.text
        assert seed.json()["usage"]["completion_tokens"] == 5
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# Losing a replica: a failed attempt is retried on another replica, and the circuit breaker takes a replica out
# after two failures (the overlay's settings). With the router's defaults the bound below held as well here: a
# killed or draining replica refuses at once, and the client's next try lands elsewhere.
RESILIENCE = ["--retry-max-retries", "3", "--retry-initial-backoff-ms", "100", "--retry-max-backoff-ms", "500",
              "--cb-failure-threshold", "2", "--cb-timeout-duration-secs", "10"]


def _landed(replicas: list[LiveServer], url: str, session: str) -> int:
    """Send one turn of ``session``; the replica that served it."""
    before = [_served(r) for r in replicas]
    resp = httpx.post(url + "/v1/chat/completions", headers={"X-Session-ID": session}, timeout=60, json={
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}], "max_tokens": 4})
    assert resp.status_code == 200, resp.text
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the log line is written as the answer leaves
        grown = [i for i, r in enumerate(replicas) if _served(r) > before[i]]
        if grown:
            return grown[0]
        time.sleep(0.05)
    raise AssertionError("no replica logged the request")


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM", "SIGSTOP"])
def test_a_lost_replica_loses_no_other_conversation(tmp_path: Path, signal_name: str) -> None:
    import os
    import signal

    servers = [start_server(tmp_path, "--n-threads", "1", "--parallel", "2", "--ctx-size", "2048",
                            "--drain-timeout-s", "5") for _ in range(3)]
    proc, url = _router(servers, "sticky_least_loaded", *RESILIENCE)
    try:
        home = {f"s{n}": _landed(servers, url, f"s{n}") for n in range(6)}
        lost = max(set(home.values()), key=list(home.values()).count)
        os.kill(servers[lost].process.pid, getattr(signal, signal_name))
        # A killed or draining replica refuses connections or answers 503 at once, and the router retries elsewhere.
        # A frozen one answers nothing: a request routed to it before its health checks fail (2 of them, 2 s
        # apart, 2 s each) waits for the router's request timeout, so the sessions go on once those have run.
        time.sleep(7.0 if signal_name == "SIGSTOP" else 0.1)
        for session, replica in home.items():
            start = time.monotonic()
            while True:
                resp = httpx.post(url + "/v1/chat/completions", headers={"X-Session-ID": session}, timeout=30,
                                  json={"messages": [{"role": "user", "content": "Again?"}], "max_tokens": 4})
                if resp.status_code == 200:
                    break
                assert replica == lost, f"{session} on a healthy replica failed: {resp.status_code} {resp.text}"
                assert time.monotonic() - start < 10, f"{session} not served elsewhere within 10 s"
                time.sleep(0.5)
            assert time.monotonic() - start < 10
    finally:
        if signal_name == "SIGSTOP":
            os.kill(servers[lost].process.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(timeout=10)
        for s in servers:
            stop_server(s)
