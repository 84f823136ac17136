"""Hostile requests, second round, as attacks on a real server over loopback (issue 29): each attack runs while a
witness streams from the same server and probes ``/health``, and must leave both going. Loads are bounded in
count and seconds.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, start_server, stop_server

KEY = "sk-round-two-3b8f0c5e1a"
AUTH = {"Authorization": f"Bearer {KEY}"}
WRITE_TIMEOUT_S = 2.0
LIMIT = 48


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("round2")
    keys = tmp / "keys"
    keys.write_text(f"# the test's key\n{KEY}\n")
    srv = start_server(tmp, "--api-key-file", str(keys), "--parallel", "2", "--queue-size", "2",
                       "--ctx-size", "8192", "--write-timeout-s", str(WRITE_TIMEOUT_S),
                       "--limit-concurrency", str(LIMIT))
    yield srv
    stop_server(srv)


@dataclass
class Witness:
    """A second client's stream (its token arrival times) and /health probes (their latencies)."""

    gaps: list[float] = field(default_factory=list)
    health: list[float] = field(default_factory=list)
    health_status: list[int] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)


@contextmanager
def witnessed(srv: LiveServer) -> Iterator[Witness]:
    witness = Witness()
    stop = threading.Event()

    def stream() -> None:
        body = {"prompt": "Once upon a time", "max_length": 2000, "ignore_eos": True, "stream": True,
                "temperature": 0.8, "seed": 1}
        try:
            with httpx.stream("POST", srv.url + "/generate", json=body, headers=AUTH, timeout=60) as resp:
                last = time.monotonic()
                for line in resp.iter_lines():
                    if line.startswith("data:") and '"token"' in line:
                        now = time.monotonic()
                        if witness.tokens:
                            witness.gaps.append(now - last)
                        last = now
                        witness.tokens += 1
                    if stop.is_set():
                        return
        except httpx.HTTPError as exc:
            witness.errors.append(repr(exc))

    def probe() -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                status = httpx.get(srv.url + "/health", timeout=5).status_code
            except httpx.HTTPError:
                status = 0
            witness.health.append(time.monotonic() - start)
            witness.health_status.append(status)
            stop.wait(0.2)

    threads = [threading.Thread(target=stream, daemon=True), threading.Thread(target=probe, daemon=True)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while witness.tokens < 3 and time.monotonic() < deadline:  # the stream is under way before the attack
        time.sleep(0.05)
    try:
        yield witness
        time.sleep(0.5)  # a last stretch of the stream after the attack
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not witness.errors, witness.errors
    assert witness.tokens >= 5, "the witness stream stopped"
    # An attack that froze the engine or the loop stopped streams for 5 s to for ever; this machine's own hiccups
    # (2 shared cores) pause a stream for up to about 3 s.
    assert max(witness.gaps) < 8.0, f"the witness stream stalled for {max(witness.gaps):.2f} s"
    assert witness.health_status and set(witness.health_status) == {200}, witness.health_status
    assert max(witness.health) < 2.0, f"/health took {max(witness.health):.2f} s"


def _post(srv: LiveServer, path: str, body: object, timeout: float = 60, **kw: object) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    resp = httpx.post(srv.url + path, json=body, headers=AUTH, timeout=timeout, **kw)  # type: ignore[arg-type]
    return resp, time.monotonic() - start


# ---- 1. tool-call parsing on model output ----

def test_an_answer_forced_to_open_a_tool_block_and_fill_it_with_blanks_comes_back_as_text(server: LiveServer
                                                                                       ) -> None:
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    schema = {"type": "string", "pattern": "^<tool_call> {600}x$"}
    with witnessed(server):
        resp, seconds = _post(server, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Say something."}], "tools": tools, "max_tokens": 800,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["message"]["tool_calls"] is None and choice["message"]["content"].startswith('"<tool_call>  ')
    if choice["finish_reason"] == "stop":
        assert json.loads(choice["message"]["content"]) == "<tool_call>" + " " * 600 + "x"
    assert seconds < 60


# ---- 2. grammars whose parse stacks multiply ----

def _levels(n: int, ambiguous_at_start: bool) -> str:
    if ambiguous_at_start:  # 2^n stacks when the grammar is made
        rules = [f'x{i} ::= x{i + 1} "b" | x{i + 1} "c"' for i in range(n)] + [f'x{n} ::= "a"']
    else:  # the stacks double with every "[" the model writes
        rules = [f'x{i} ::= "[" x{i + 1} | "[" x{i + 1}' for i in range(n)] + [f'x{n} ::= "x"']
    return "root ::= x0\n" + "\n".join(rules) + "\n"


def test_a_grammar_of_30_ambiguous_levels_is_refused_within_a_second(server: LiveServer) -> None:
    with witnessed(server):
        resp, seconds = _post(server, "/generate", {"prompt": "Hi", "max_length": 8, "grammar": _levels(30, True)})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "grammar", resp.text
    assert "ambiguous" in resp.json()["error"]["message"]
    assert seconds < 1.0


def test_a_grammar_whose_stacks_double_with_each_character_is_served_within_its_bound(server: LiveServer) -> None:
    with witnessed(server):
        resp, seconds = _post(server, "/generate", {"prompt": "Hi", "max_length": 40, "temperature": 0,
                                                    "grammar": _levels(30, False)})
    assert resp.status_code == 200, resp.text
    assert resp.json()["text"] == "[" * 30 + "x"  # the only sentence of the grammar
    assert seconds < 10


def test_a_grammar_whose_candidate_checks_multiply_is_served_within_its_bound(server: LiveServer) -> None:
    """200 equal alternatives under a star: checking one token of L characters against them costs 200^L unless
    the check has a budget (past it, candidates are refused: stricter, never looser)."""
    grammar = ("root ::= x*\nx ::= " + " | ".join(f"a{i}" for i in range(200)) + "\n"
               + "".join(f"a{i} ::= [a-df-z ]\n" for i in range(200)))
    with witnessed(server):
        resp, seconds = _post(server, "/generate", {"prompt": "The house", "max_length": 6, "grammar": grammar})
    assert resp.status_code in (200, 400), resp.text
    if resp.status_code == 200:
        assert "e" not in resp.json()["text"]  # whatever got through matches the grammar
    assert seconds < 30


def test_a_grammar_that_can_lose_its_last_parse_ends_the_request_cleanly(server: LiveServer) -> None:
    """The stacks' bound can drop the one path a token needed (256 stacks of one branch fill it first); the grammar
    then reaches a dead end, which ends the request with an error, never the process."""
    grammar = ('root ::= "t" (a | b)\na ::= "he"\nb ::= "h" c\nc ::= ' + " | ".join(['"x"'] * 256) + "\n")
    for _ in range(3):
        resp, _ = _post(server, "/generate", {"prompt": "Write the word: the", "max_length": 4, "temperature": 0,
                                              "grammar": grammar})
        assert resp.status_code in (200, 400, 500), resp.text
        if resp.status_code == 200:
            assert resp.json()["text"] in ("t", "th", "the", "thx"), resp.json()["text"]
        else:
            assert resp.json()["error"]["message"]
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    ok, _ = _post(server, "/generate", {"prompt": "Hi", "max_length": 2})
    assert ok.status_code == 200


def test_a_schema_of_nested_ambiguous_arrays_is_served_and_valid(server: LiveServer) -> None:
    """Each level is an anyOf of two arrays of the next: every "[" the model writes doubles the parse stacks."""
    depth = 24  # 2^24 parse stacks by the last "[" without the bound
    defs: dict[str, object] = {"l0": {"type": "integer"}}
    for i in range(1, depth + 1):
        ref = {"$ref": f"#/$defs/l{i - 1}"}
        defs[f"l{i}"] = {"anyOf": [{"type": "array", "items": ref, "maxItems": 1},
                                   {"type": "array", "items": ref, "minItems": 1}]}
    schema = {"$defs": defs, "type": "object", "properties": {"v": {"$ref": f"#/$defs/l{depth}"}}, "required": ["v"]}
    nested = "[" * depth + "1" + "]" * depth
    prompt = f'A deeply nested list as JSON: {{"v": {nested}}}\nAnother one, as JSON: '
    with witnessed(server):
        resp, seconds = _post(server, "/v1/completions", {
            "prompt": prompt, "max_tokens": 64, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}})
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["text"].startswith("{")
    if choice["finish_reason"] == "stop":
        value = json.loads(choice["text"])  # what the model wrote parses, nested as the grammar allows
        assert set(value) == {"v"}
    assert seconds < 30


# ---- 3. pattern quantifiers ----

def test_a_ten_million_repeat_pattern_is_refused_at_once(server: LiveServer) -> None:
    schema = {"type": "string", "pattern": "^a{10000000}$"}
    _post(server, "/generate", {"prompt": "Hi", "max_length": 1})  # warm
    resp, seconds = _post(server, "/generate", {"prompt": "Hi", "max_length": 4, "json_schema": schema})
    assert resp.status_code == 400 and "repeats 10000000 times" in resp.json()["error"]["message"], resp.text
    assert seconds < 0.5


# ---- 4. clients that never read ----

def test_clients_that_never_read_are_closed_in_bounded_time_and_the_probes_answer_meanwhile(server: LiveServer
                                                                                           ) -> None:
    """The bundle (1.5 MB) fits the kernel's send buffer on loopback, so these connections end by the header
    deadline once their answer is written; the write timeout itself is the next test's (a stream far larger
    than the buffers)."""
    host, port = server.url.removeprefix("http://").split(":")
    sockets = []
    try:
        for _ in range(LIMIT + 8):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client's window fills at once
            sock.connect((host, int(port)))
            sock.sendall(b"GET /docs-assets/swagger-ui-bundle.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sockets.append(sock)
        time.sleep(0.5)
        full = httpx.get(server.url + "/v1/models", headers=AUTH, timeout=10)
        assert full.status_code == 503 and full.json()["error"]["code"] == "over_capacity"
        start = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        assert httpx.get(server.url + "/ready", timeout=5).status_code == 200
        assert time.monotonic() - start < 1.0
        # The stalled connections are closed (the header deadline, 10 s, or the write timeout), and the room is free.
        deadline = time.monotonic() + WRITE_TIMEOUT_S + 15
        while httpx.get(server.url + "/v1/models", headers=AUTH, timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "stalled connections still hold the server's room"
            time.sleep(0.2)
        closed = 0
        for sock in sockets:
            sock.settimeout(5)
            try:
                while sock.recv(1 << 20):
                    pass
                closed += 1
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                pass
        assert closed >= LIMIT - 4, f"only {closed} of {len(sockets)} stalled connections were closed"
    finally:
        for sock in sockets:
            sock.close()


def test_a_stream_whose_client_stops_reading_ends_and_frees_its_slot(server: LiveServer) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    # Large chunks (five alternatives a token) fill the socket's buffers within seconds.
    body = json.dumps({"prompt": "Count: 1 2 3", "max_tokens": 3000, "ignore_eos": True, "stream": True,
                       "logprobs": 5}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    try:
        deadline = time.monotonic() + 60
        busy = 1
        while time.monotonic() < deadline:
            busy = httpx.get(server.url + "/ready", timeout=5).json()["slots_busy"]
            if busy == 0:
                break
            time.sleep(0.25)
        assert busy == 0, "the stalled stream still holds its slot"
    finally:
        sock.close()


# ---- 5. the key before the body ----

def test_a_large_body_without_a_key_is_refused_without_being_parsed(server: LiveServer) -> None:
    junk = b"{" + b"x" * (4 * 2**20 - 16)  # not JSON: parsed, it would be a 400 invalid_json
    with witnessed(server) as witness:
        for _ in range(3):
            resp = httpx.post(server.url + "/v1/chat/completions", content=junk,
                              headers={"Content-Type": "application/json"}, timeout=30)
            assert resp.status_code == 401, resp.text
            assert resp.json()["error"]["code"] == "invalid_api_key"
            assert resp.headers["www-authenticate"] == "Bearer"
    assert max(witness.health) < 0.5
    with_key = httpx.post(server.url + "/v1/chat/completions", content=junk[:1000], headers=AUTH, timeout=30)
    assert with_key.status_code == 400 and with_key.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions", "/tokenize",
                                  "/detokenize", "/v1/models", "/no/such/route"])
def test_every_api_route_needs_the_key_and_the_probes_do_not(server: LiveServer, path: str) -> None:
    resp = httpx.request("GET" if path in ("/v1/models", "/no/such/route") else "POST", server.url + path,
                         json={}, timeout=10)
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
    for open_path in ("/health", "/ready", "/metrics", "/info", "/", "/docs", "/openapi.json"):
        assert httpx.get(server.url + open_path, timeout=10).status_code == 200, open_path


def test_pages_say_they_may_not_be_framed(server: LiveServer) -> None:
    for path in ("/", "/docs", "/static/app.js"):
        resp = httpx.get(server.url + path, timeout=10)
        assert "frame-ancestors 'none'" in resp.headers["content-security-policy"], path
        assert resp.headers["x-frame-options"] == "DENY" and resp.headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self';" not in httpx.get(server.url + "/docs").headers["content-security-policy"]
    assert "'unsafe-inline'" not in httpx.get(server.url + "/").headers["content-security-policy"]


# ---- 6. /tokenize and /detokenize ----

def test_a_four_megabyte_tokenize_is_refused_before_tokenizing(server: LiveServer) -> None:
    resp, seconds = _post(server, "/tokenize", {"content": "word " * (4 * 2**20 // 5 - 100)})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded", resp.text
    assert resp.json()["error"]["param"] == "content"
    assert seconds < 1.0
    resp, _ = _post(server, "/detokenize", {"tokens": [42] * 100_000})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "tokens"
    ok, _ = _post(server, "/tokenize", {"content": "Hello world", "with_pieces": True})
    assert [p["piece"] for p in ok.json()["tokens"]] == ["Hello", " world"]


def test_tokenize_answers_curl_form_bodies(server: LiveServer) -> None:
    resp = httpx.post(server.url + "/tokenize", content=b'{"content": "hi"}', timeout=10,
                      headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 200 and resp.json()["tokens"], resp.text


# ---- 7. n, max_tokens and logprobs ----

def test_n_above_the_slots_and_huge_logprob_answers_are_refused(server: LiveServer) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    resp, _ = _post(server, "/v1/chat/completions", {"messages": messages, "n": 16, "max_tokens": 4})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "n", resp.text
    resp, _ = _post(server, "/v1/chat/completions", {"messages": messages, "n": 2, "max_tokens": 4000,
                                                     "logprobs": True, "top_logprobs": 20})
    assert resp.status_code == 400 and "log-probabilities" in resp.json()["error"]["message"], resp.text[:300]
    ok, _ = _post(server, "/v1/chat/completions", {"messages": messages, "n": 2, "max_tokens": 3, "logprobs": True,
                                                   "top_logprobs": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
    assert len(ok.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2


# ---- 10. the size check counts what the template renders ----

def test_tool_definitions_count_toward_the_prompt_size(server: LiveServer) -> None:
    big = {"type": "object", "description": "x " * 1_000_000}
    tools = [{"type": "function", "function": {"name": "f", "parameters": big}}]
    resp, seconds = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                           "tools": tools, "max_tokens": 4})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded", resp.text
    assert seconds < 5


def test_many_small_messages_are_rendered_in_linear_time(server: LiveServer) -> None:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "<|im_end|>" if i == 0 else "a"}
                for i in range(20_000)]  # the control-token text takes the piece-by-piece path
    resp, seconds = _post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 1})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded", resp.text
    assert seconds < 10


# ---- 11. control tokens by id on /generate ----

def test_generate_refuses_control_token_ids_like_completions(server: LiveServer) -> None:
    resp, _ = _post(server, "/generate", {"prompt": [19556, 2, 1], "max_length": 1})
    assert resp.status_code == 400 and "control token" in resp.json()["error"]["message"], resp.text
    ok, _ = _post(server, "/generate", {"prompt": [19556, 1489], "max_length": 1})
    assert ok.status_code == 200, ok.text


# ---- 9. a hostile chat template ----

HOSTILE_TEMPLATES = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "string multiplication": "{{ 'a' * 100000000000 }}",
}


@pytest.mark.parametrize("template", list(HOSTILE_TEMPLATES.values()), ids=list(HOSTILE_TEMPLATES))
def test_a_hostile_chat_template_is_refused_on_first_use_and_after(tmp_path: Path, template: str) -> None:
    srv = start_server(tmp_path, "--chat-template", template)
    try:
        first = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]},
                           timeout=10)
        assert first.status_code == 500 and first.json()["error"]["code"] == "invalid_chat_template", first.text
        assert "chat template is refused" in srv.log()
        start = time.monotonic()  # refused once for all: the next request does not try it again
        resp = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]},
                          timeout=10)
        assert resp.status_code == 500 and resp.json()["error"]["code"] == "invalid_chat_template", resp.text
        assert time.monotonic() - start < 1.0
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
        gen = httpx.post(srv.url + "/generate", json={"prompt": "Hi", "max_length": 2}, timeout=30)
        assert gen.status_code == 200  # the rest of the server serves on
    finally:
        stop_server(srv)


def test_a_server_on_every_address_without_a_key_refuses_to_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO, free_port

    done = subprocess.run([sys.executable, "-m", "server", "serve", "--host", "0.0.0.0", "--port", str(free_port())],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "refusing to listen on 0.0.0.0 without an API key" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
