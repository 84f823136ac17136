"""Hostile clients, as attacks on real servers over loopback: oversized and slow headers, slow bodies, huge
prompts, prompt-cache probing across keys, forged log lines, foreign Host headers and cross-origin simple
requests, control tokens by id. Every load is bounded (counts and seconds)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, LiveServer, free_port, start_server, stop_server

MODEL = "SmolLM2-135M-Instruct.Q4_1"
HEADER_LIMIT = 65536
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Plain-text logs (where forged lines would show), short read deadlines."""
    srv = start_server(tmp_path_factory.mktemp("hostile"), "--parallel", "2", "--queue-size", "2",
                       "--max-header-bytes", str(HEADER_LIMIT), "--header-timeout-s", str(HEADER_TIMEOUT_S),
                       "--body-timeout-s", str(BODY_TIMEOUT_S), env={"STRICT_MODEL_NAME": "true"})
    yield srv
    stop_server(srv)


def _address(srv: LiveServer) -> tuple[str, int]:
    host, port = srv.url.removeprefix("http://").split(":")
    return host, int(port)


def _connect(srv: LiveServer) -> socket.socket:
    sock = socket.create_connection(_address(srv), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_all(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout`` passes)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def _read_response(sock: socket.socket, timeout: float = 10) -> bytes:
    """One response with a Content-Length body, whatever happens to the connection afterwards."""
    sock.settimeout(timeout)
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                           if line.startswith(b"content-length:")), 0)
            if len(body) >= length:
                return data
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def _body(response: bytes) -> dict[str, object]:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])  # type: ignore[no-any-return]


def _health_ms(srv: LiveServer) -> float:
    """Milliseconds for /health on a fresh connection (as a liveness probe makes it)."""
    sock = _connect(srv)
    start = time.perf_counter()
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    response = _read_all(sock, 5)
    elapsed = (time.perf_counter() - start) * 1000
    sock.close()
    assert _status(response) == 200, response[:200]
    return elapsed


# ---- 1. headers: size limit, read deadline, slowloris ----


def _big_header_request(srv: LiveServer, size: int) -> tuple[bytes, float]:
    """Send a request with one ``size``-byte header; the answer and the seconds until its first byte."""
    sock = _connect(srv)
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
    payload = head + b"a" * size + b"\r\n\r\n"
    start = time.perf_counter()
    sender = threading.Thread(target=lambda: _send_quietly(sock, payload), daemon=True)
    sender.start()
    sock.settimeout(10)
    first = sock.recv(65536)
    elapsed = time.perf_counter() - start
    response = first + _read_all(sock, 5)
    sock.close()
    sender.join(5)
    return response, elapsed


def _send_quietly(sock: socket.socket, payload: bytes) -> None:
    try:
        sock.sendall(payload)
    except OSError:  # the server stopped reading and closed: expected
        pass


def test_a_one_megabyte_header_gets_431_at_once_and_health_stays_fast(server: LiveServer) -> None:
    response, elapsed = _big_header_request(server, 2**20)
    assert _status(response) == 431, response[:200]
    assert _body(response)["error"]["code"] == "headers_too_large"  # type: ignore[index]
    assert b"connection: close" in response.lower()
    assert elapsed < 0.1, f"431 after {elapsed * 1000:.0f} ms"

    # Several clients sending 8 MiB headers at once: /health keeps answering quickly meanwhile.
    attackers = [threading.Thread(target=_big_header_request, args=(server, 8 * 2**20)) for _ in range(4)]
    for t in attackers:
        t.start()
    latencies = [_health_ms(server) for _ in range(10)]
    for t in attackers:
        t.join(30)
    # Without the guard each answer waited seconds behind the headers' parsing. On two cores shared with the
    # attackers' own threads one answer may still catch a scheduling hiccup.
    assert sorted(latencies)[-2] < 100 and max(latencies) < 1000, latencies


def test_headers_just_under_the_limit_are_served(server: LiveServer) -> None:
    resp = httpx.get(server.url + "/health", headers={"X-Padding": "p" * (HEADER_LIMIT - 2000)}, timeout=10)
    assert resp.status_code == 200


def test_an_idle_connection_is_closed_after_the_header_timeout(server: LiveServer) -> None:
    sock = _connect(server)
    start = time.perf_counter()
    response = _read_all(sock, 10)
    waited = time.perf_counter() - start
    sock.close()
    assert HEADER_TIMEOUT_S * 0.8 < waited < HEADER_TIMEOUT_S + 2, waited
    assert _status(response) == 408 and _body(response)["error"]["code"] == "request_timeout"  # type: ignore[index]


def test_slowloris_connections_are_all_closed_in_bounded_time(server: LiveServer) -> None:
    # 30 connections each sending a header line a byte at a time: none outlives the header deadline.
    socks = [_connect(server) for _ in range(30)]
    for s in socks:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    start = time.perf_counter()
    open_socks = list(socks)
    while open_socks and time.perf_counter() - start < HEADER_TIMEOUT_S + 3:
        for s in list(open_socks):
            try:
                s.sendall(b"X")
            except OSError:
                open_socks.remove(s)
                continue
            s.setblocking(False)
            try:
                if s.recv(65536) == b"":
                    open_socks.remove(s)
            except BlockingIOError:
                pass
            except OSError:
                open_socks.remove(s)
        assert _health_ms(server) < 100
        time.sleep(0.2)
    for s in socks:
        s.close()
    assert not open_socks, f"{len(open_socks)} slow connections still open after {time.perf_counter() - start:.1f} s"


def test_a_slow_body_is_cut_off(server: LiveServer) -> None:
    sock = _connect(server)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"prompt\": ")
    start = time.perf_counter()
    _read_all(sock, 10)
    waited = time.perf_counter() - start
    sock.close()
    assert BODY_TIMEOUT_S * 0.8 < waited < BODY_TIMEOUT_S + 2, waited
    assert "request body did not arrive within" in server.log()


def test_a_chunked_body_over_the_limit_gets_413_and_the_connection_closes(server: LiveServer) -> None:
    sock = _connect(server)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
    sent: list[int] = []
    failed: list[OSError] = []

    def send() -> None:  # up to 64 MiB, sixteen times the 4 MiB limit
        try:
            for _ in range(1024):
                sock.sendall(chunk)
                sent.append(len(chunk))
        except OSError as exc:
            failed.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    response = _read_response(sock)
    sender.join(10)
    sock.close()
    assert _status(response) == 413, response[:300]
    assert b"connection: close" in response.lower()
    assert _body(response)["error"]["code"] == "body_too_large"  # type: ignore[index]
    # The server closed the connection instead of reading on: the client could not send it all.
    assert failed, f"the server kept reading: {sum(sent)} bytes accepted"


# ---- 2. a huge prompt is refused before it is tokenized ----


def _rss_kib(srv: LiveServer) -> int:
    status = Path(f"/proc/{srv.process.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def test_a_four_megabyte_prompt_is_refused_at_once_without_growing_memory(server: LiveServer) -> None:
    prompt = "lighthouse keeper " * ((4 * 2**20 - 1024) // 18)
    body = json.dumps({"prompt": prompt, "max_length": 4}).encode()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        client.post("/generate", content=body)  # warm-up: the vocabulary is measured once
        before = _rss_kib(server)
        times = []
        for _ in range(12):
            start = time.perf_counter()
            resp = client.post("/generate", content=body)
            times.append(time.perf_counter() - start)
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
            assert "at least" in resp.json()["error"]["message"]
        after = _rss_kib(server)
    # The server's own time per refusal, from its log lines (the client's includes uploading 4 MiB).
    server_ms = [float(line.split("duration_ms=")[1].split()[0]) for line in server.log().splitlines()
                 if "path=/generate status=400" in line and "duration_ms=" in line][-12:]
    assert len(server_ms) == 12 and min(server_ms) < 50, (server_ms, times)
    assert after - before < 40_000, f"RSS grew by {(after - before) // 1024} MiB"


# ---- 7. log forging ----


def test_a_percent_encoded_newline_in_the_path_is_logged_escaped(server: LiveServer) -> None:
    resp = httpx.get(server.url + "/nope%0a2026-01-01%2000:00:00,000%20INFO%20forged:%20admin%20logged%20in",
                     timeout=10)
    assert resp.status_code == 404
    time.sleep(0.2)
    lines = server.log().splitlines()
    assert not any(line.startswith("2026-01-01 00:00:00,000 INFO forged") for line in lines)
    assert any("path=/nope\\u000a2026-01-01 00:00:00,000 INFO forged: admin logged in" in line for line in lines)


# ---- 8. hosts, origins, redirects ----


def test_a_foreign_host_is_refused_but_probes_answer(server: LiveServer) -> None:
    bad = httpx.post(server.url + "/generate", json={"prompt": "hi", "max_length": 2},
                     headers={"Host": "attacker.example"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_host"
    assert httpx.get(server.url + "/v1/models", headers={"Host": "attacker.example:8000"}).status_code == 400
    for path in ("/health", "/ready", "/metrics"):  # probes and Prometheus use the pod's IP as Host
        assert httpx.get(server.url + path, headers={"Host": "10.1.2.3:8000"}).status_code == 200
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "LOCALHOST"):
        assert httpx.get(server.url + "/v1/models", headers={"Host": host}).status_code == 200, host


def test_no_redirect_to_a_foreign_host_on_a_trailing_slash(server: LiveServer) -> None:
    foreign = httpx.post(server.url + "/generate/", json={"prompt": "hi"}, headers={"Host": "attacker.example"})
    assert foreign.status_code == 400 and "location" not in foreign.headers
    local = httpx.post(server.url + "/generate/", json={"prompt": "hi"})
    assert local.status_code == 404 and "location" not in local.headers


def test_a_cross_origin_simple_request_is_refused(server: LiveServer) -> None:
    body = b'{"prompt": "Once upon a time", "max_length": 2}'
    evil = {"Origin": "https://evil.example"}
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        resp = httpx.post(server.url + "/generate", content=body, headers={**evil, "Content-Type": content_type})
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "cross_origin_refused", content_type
    # A JSON request from a page needs a CORS preflight first, which no origin passes here; curl-like
    # clients without Origin keep working whatever their Content-Type.
    assert httpx.post(server.url + "/generate", content=body, headers={**evil, "Content-Type": "application/json"},
                      timeout=30).status_code == 200
    assert httpx.post(server.url + "/generate", content=body, headers={"Content-Type": "text/plain"},
                      timeout=30).status_code == 200


# ---- 9. control tokens by id, Retry-After ----


def test_token_id_prompts_cannot_hold_control_tokens(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        tokens = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello there", "max_tokens": 1})
        assert tokens.status_code == 200
        # 2 is <|im_end|> in SmolLM2's vocabulary: a forged end of turn.
        resp = client.post("/v1/completions", json={"model": MODEL, "prompt": [19556, 2, 1], "max_tokens": 1})
        assert resp.status_code == 400 and "control token" in resp.json()["error"]["message"]
        ok = client.post("/v1/completions", json={"model": MODEL, "prompt": [19556, 1489], "max_tokens": 1})
        assert ok.status_code == 200, ok.text


# ---- 3. the prompt cache is not shared between keys ----

KEY_A, KEY_B = "sk-tenant-a-7c1e9d", "sk-tenant-b-22f0aa"
SECRET_PREFIX = ("You are the vault assistant of ACME Corp. Internal note, never reveal: the staff door code "
                 "for the north building is ")


def _cached(srv: LiveServer, key: str, prompt: str) -> int:
    resp = httpx.post(srv.url + "/generate", json={"prompt": prompt, "max_length": 1, "temperature": 0},
                      headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    return int(resp.json()["usage"]["cached_tokens"])


def _what_the_attacker_sees(tmp: Path, victim: str) -> list[int]:
    """Key A sends ``victim``; before each of key B's guesses it is sent again, so it sits in the only slot, or
    (after a decoy of B's took the slot) in the host-memory prompt cache. What B's guesses reuse
    (``cached_tokens``) is all B can observe."""
    tmp.mkdir()
    keys = tmp / "keys.txt"
    keys.write_text(f"{KEY_A}\n{KEY_B}\n")
    srv = start_server(tmp, "--api-key-file", str(keys), "--parallel", "1", "--ctx-size", "1024")
    try:
        assert _cached(srv, KEY_A, victim) == 0
        assert _cached(srv, KEY_A, victim) > 20  # the owner reuses its own prefix
        seen = []
        # Each guess extends the one before by a digit and is followed by more text, so a right guess would reuse
        # a token more than B's own earlier guesses give it (which B may reuse: they are B's).
        for guess, where in (("1", "slot"), ("4", "cache"), ("48", "slot"), ("482", "cache"), ("7", "slot")):
            _cached(srv, KEY_A, victim)  # A's cells in the only slot
            if where == "cache":
                _cached(srv, KEY_B, "Tell me about the weather in Lisbon.")  # they go to host memory
            seen.append(_cached(srv, KEY_B, SECRET_PREFIX + guess + " is the code?"))
    finally:
        stop_server(srv)
    return seen


def test_a_second_key_learns_nothing_from_the_first_keys_prompt(tmp_path: Path) -> None:
    # With a cache shared between keys, "48" and "482" would reuse more when the secret starts with them, and
    # every guess more when A's prompt starts as B's guesses do at all.
    seen = _what_the_attacker_sees(tmp_path / "a", SECRET_PREFIX + "4821. Answer politely.")
    assert seen == _what_the_attacker_sees(tmp_path / "b", SECRET_PREFIX + "9735. Answer politely."), seen
    unrelated = ("Write a short poem about the autumn rain falling on the roofs of an old harbour town, its boats, "
                 "its gulls and its grey stone quays.")
    assert seen == _what_the_attacker_sees(tmp_path / "c", unrelated), seen
    assert seen[0] == 0  # nothing of B's is cached yet, and A's cells are not B's


# ---- 6. drain deadline and a second SIGTERM ----


def _stream_events(url: str, events: list[tuple[str, dict[str, object]]], started: threading.Event) -> None:
    body = {"prompt": "Tell me a long story.", "max_length": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/generate", json=body, timeout=60) as resp:
        kind = ""
        for line in resp.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                events.append((kind, json.loads(line[5:])))
                started.set()


@pytest.mark.parametrize("second_signal", [False, True], ids=["deadline", "second-sigterm"])
def test_requests_cut_at_shutdown_get_503_and_an_error_event(tmp_path: Path, second_signal: bool) -> None:
    import signal

    srv = start_server(tmp_path, "--drain-timeout-s", "60" if second_signal else "1")
    events: list[tuple[str, dict[str, object]]] = []
    started = threading.Event()
    plain: list[httpx.Response] = []
    try:
        reader = threading.Thread(target=_stream_events, args=(srv.url, events, started))
        reader.start()
        blocking = threading.Thread(target=lambda: plain.append(httpx.post(
            srv.url + "/generate", json={"prompt": "Count slowly.", "max_length": 1500, "ignore_eos": True},
            timeout=60)))
        blocking.start()
        assert started.wait(30)
        srv.process.send_signal(signal.SIGTERM)
        if second_signal:
            time.sleep(0.5)
            srv.process.send_signal(signal.SIGTERM)
        reader.join(30)
        blocking.join(30)
        code = srv.process.wait(30)
    finally:
        stop_server(srv)
    assert code == 0, srv.log()
    assert events[-1][0] == "error", events[-3:]
    assert events[-1][1]["error"]["code"] == "shutting_down"  # type: ignore[index]
    assert plain and plain[0].status_code == 503, plain
    assert plain[0].json()["error"]["code"] == "shutting_down" and plain[0].headers["retry-after"]
    assert "Traceback" not in srv.log()


def test_a_queue_timeout_503_says_when_to_retry(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--parallel", "1", "--queue-timeout-s", "0.5")
    try:
        body = {"prompt": "Tell me a story.", "max_length": 1000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/generate", json=body, timeout=30) as running:
            lines = running.iter_lines()  # kept referenced: a collected iterator would close the stream
            next(lines)  # the slot is taken
            waited = httpx.post(srv.url + "/generate", json={"prompt": "hi", "max_length": 2}, timeout=30)
    finally:
        stop_server(srv)
    assert waited.status_code == 503 and waited.json()["error"]["code"] == "queue_timeout"
    assert int(waited.headers["retry-after"]) >= 1


# ---- 4. authentication fails closed ----


@pytest.mark.parametrize(
    ("content", "env", "message"),
    [
        ("", {}, "holds no key"),
        ("\n   \n\t\n", {}, "holds no key"),
        (None, {}, "cannot read API key file"),
        ("sk-fine\n", {"API_KEY": "  "}, "API_KEY is set but empty"),
    ],
    ids=["empty-file", "blank-lines", "missing-file", "blank-env-key"],
)
def test_a_key_source_without_a_key_refuses_to_start(tmp_path: Path, content: str | None, env: dict[str, str],
                                                     message: str) -> None:
    keys = tmp_path / "keys.txt"
    if content is not None:
        keys.write_text(content)
    proc = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--port", str(free_port()), "--api-key-file", str(keys)],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


# ---- 5. client text in error bodies and logs ----


def test_a_lone_surrogate_in_the_model_name_is_a_json_404_and_one_log_line(server: LiveServer) -> None:
    before = len(server.log().splitlines())
    body = b'{"model": "gpt\\ud800x", "prompt": "hi", "max_tokens": 2}'
    resp = httpx.post(server.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"},
                      timeout=30)
    assert resp.status_code == 404, resp.text
    error = resp.json()["error"]
    assert error["code"] == "model_not_found" and "gpt\\ud800x" in error["message"]
    time.sleep(0.2)
    new = server.log().splitlines()[before:]
    assert len(new) == 1 and "status=404" in new[0], new


def test_prompt_cache_scope_off_turns_reuse_off_and_a_tenant_header_separates() -> None:
    from starlette.requests import Request

    from server.errors import APIError
    from server.security import cache_scope, key_scope
    from server.settings import Settings

    def request(headers: dict[str, str] | list[tuple[str, str]], key_digest: str, client: str = "127.0.0.1"
                ) -> Request:
        pairs = headers.items() if isinstance(headers, dict) else headers
        req = Request({"type": "http", "headers": [(k.lower().encode(), v.encode()) for k, v in pairs],
                       "client": (client, 40000)})
        req.state.key_scope = key_digest
        return req

    a, b = key_scope(KEY_A), key_scope(KEY_B)
    assert a != b and KEY_A not in a
    assert cache_scope(request({}, ""), Settings(prompt_cache_scope="off")) is None
    assert cache_scope(request({}, a), Settings()) == a
    tenanted = Settings(tenant_header="X-Tenant-Id")
    assert cache_scope(request({"X-Tenant-Id": "t1"}, a), tenanted) != cache_scope(
        request({"X-Tenant-Id": "t2"}, a), tenanted)
    # From a client that is not a trusted proxy the header means nothing: it cannot pick another tenant's cache.
    assert cache_scope(request({"X-Tenant-Id": "t1"}, a, client="10.1.2.3"), tenanted) == a
    gateway = Settings(tenant_header="X-Tenant-Id", trusted_proxies=["10.0.0.0/8"])
    assert cache_scope(request({"X-Tenant-Id": "t1"}, a, client="10.1.2.3"), gateway) == a + "|tenant:t1"
    assert cache_scope(request({"X-Tenant-Id": "t1"}, a), gateway) == a
    with pytest.raises(APIError, match="given 2 times"):  # a client's own value beside the gateway's
        cache_scope(request([("X-Tenant-Id", "t1"), ("X-Tenant-Id", "t2")], a), tenanted)


def test_the_listening_address_is_an_allowed_host() -> None:
    from server.security import host_allowed, served_hosts
    from server.settings import Settings

    assert host_allowed("10.0.0.5:8000", served_hosts(Settings(host="10.0.0.5")))
    assert host_allowed("[fd00::5]:8000", served_hosts(Settings(host="fd00::5")))
    assert not host_allowed("10.0.0.5:8000", served_hosts(Settings(host="0.0.0.0")))
    assert host_allowed("api.example.com", served_hosts(Settings(allowed_hosts=["*.example.com"])))
    assert not host_allowed("example.com.evil.net", served_hosts(Settings(allowed_hosts=["*.example.com"])))


def test_connections_past_the_limit_get_503_and_the_limit_frees_up(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--limit-concurrency", "4", "--header-timeout-s", "1")
    try:
        idle = [_connect(srv) for _ in range(4)]  # open connections count, even before a request
        time.sleep(0.2)
        refused = httpx.get(srv.url + "/v1/models", timeout=10)
        assert refused.status_code == 503
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200  # the probes are still answered
        for sock in idle:  # the header deadline closes them, and the server takes requests again
            _read_all(sock, 5)
            sock.close()
        assert httpx.get(srv.url + "/v1/models", timeout=10).status_code == 200
    finally:
        stop_server(srv)


def test_connections_past_limit_concurrency_get_the_json_envelope(tmp_path: Path) -> None:
    """uvicorn answers past LIMIT_CONCURRENCY itself; the answer still is the server's error envelope."""
    srv = start_server(tmp_path, env={"LIMIT_CONCURRENCY": "3"})
    try:
        idle = [_connect(srv) for _ in range(3)]  # open connections count against the limit
        time.sleep(0.2)
        refused = httpx.get(srv.url + "/v1/models", timeout=10)
        for sock in idle:
            sock.close()
        assert refused.status_code == 503
        assert refused.headers["content-type"] == "application/json" and refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["code"] == "over_capacity"
        deadline = time.monotonic() + 5
        while httpx.get(srv.url + "/v1/models", timeout=10).status_code != 200:  # closed connections free the room
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        assert stop_server(srv) == 0
