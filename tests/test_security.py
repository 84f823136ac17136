"""Authentication, CORS, body limits and hostile input, on real servers over loopback."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import LiveServer, start_server, stop_server

KEY = "sk-test-4f1d2c9a7b"
MODEL = "SmolLM2-135M-Instruct.Q4_1"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("secured")
    keys = tmp / "keys.txt"
    keys.write_text("sk-other-key-5a9c\n" + KEY + "\n")
    server = start_server(tmp, "--api-key-file", str(keys), "--cors-origins", '["https://app.example"]',
                          "--max-body-bytes", "65536", "--parallel", "2", env={"LOG_JSON": "true"})
    yield server
    stop_server(server)


GENERATION_ROUTES = [
    ("POST", "/generate", {"prompt": "hi", "max_length": 2}),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 2}),
    ("GET", "/v1/models", None),
]


@pytest.mark.parametrize(("method", "path", "body"), GENERATION_ROUTES, ids=[r[1] for r in GENERATION_ROUTES])
def test_generation_routes_need_the_key(secured: LiveServer, method: str, path: str,
                                        body: dict[str, object] | None) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        resp = httpx.request(method, secured.url + path, json=body, headers=headers, timeout=30)
        assert resp.status_code == 401, (headers, resp.text)
        assert resp.json()["error"]["type"] == "authentication_error"
        assert resp.headers["www-authenticate"] == "Bearer"
    ok = httpx.request(method, secured.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=60)
    assert ok.status_code == 200, ok.text
    also = httpx.request(method, secured.url + path, json=body, headers={"X-API-Key": "sk-other-key-5a9c"}, timeout=60)
    assert also.status_code == 200


def test_health_ready_and_metrics_stay_open(secured: LiveServer) -> None:
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(secured.url + path).status_code == 200


def test_the_openai_sdk_sends_the_key(secured: LiveServer) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=secured.url + "/v1", api_key="nope", max_retries=0).models.list()
    client = openai.OpenAI(base_url=secured.url + "/v1", api_key=KEY, max_retries=0)
    assert client.models.list().data[0].id == MODEL


def test_the_key_never_reaches_the_log(secured: LiveServer) -> None:
    httpx.post(secured.url + "/generate", json={"prompt": "secret prompt text", "max_length": 2},
               headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    log = secured.log()
    assert KEY not in log and "secret prompt text" not in log  # neither keys nor prompts (LOG_PROMPTS is off)
    assert '"path": "/generate", "status": 200' in log and '"prompt_tokens":' in log


def test_cors_allows_only_the_configured_origin(secured: LiveServer, live_server: LiveServer) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(secured.url + "/generate", headers=preflight)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
    evil = httpx.options(secured.url + "/generate", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in evil.headers
    # Off by default: the default server sends no CORS headers at all.
    plain = httpx.get(live_server.url + "/health", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in plain.headers


def test_oversized_body_is_413_with_the_envelope(secured: LiveServer) -> None:
    resp = httpx.post(secured.url + "/generate", json={"prompt": "x" * 100_000},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert resp.status_code == 413
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


# ---- Hostile input on the default server ----


@pytest.mark.parametrize(
    ("prompt", "status"),
    [
        ("before\u0000after", 200),  # NUL bytes are text like any other
        ("\u0001\u0002\u001b[31mred\u007f\u009b", 200),  # control characters
        ("</s> <s> <|endoftext|> [INST]", 200),
    ],
)
def test_odd_but_valid_prompts_are_served(http: httpx.Client, prompt: str, status: int) -> None:
    resp = http.post("/generate", json={"prompt": prompt, "max_length": 3, "temperature": 0})
    assert resp.status_code == status, resp.text
    assert resp.json()["usage"]["prompt_tokens"] >= 2


def test_lone_surrogates_are_refused_clearly(http: httpx.Client) -> None:
    body = b'{"prompt": "bad \\ud800 surrogate", "max_length": 3}'
    resp = http.post("/generate", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "lone surrogate" in resp.json()["error"]["message"]
    chat = b'{"model": "%s", "messages": [{"role": "user", "content": "x\\udfff"}]}' % MODEL.encode()
    resp = http.post("/v1/chat/completions", content=chat, headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages.0.content"


def test_special_token_text_is_not_a_control_token(http: httpx.Client) -> None:
    # '<|im_end|>' is token 2 when parsed as a control token; as text it is several ordinary tokens.
    body = http.post("/generate", json={"prompt": "<|im_end|>", "max_length": 1, "temperature": 0}).json()
    assert body["usage"]["prompt_tokens"] > 3


def test_a_one_megabyte_prompt_gets_the_context_error(http: httpx.Client) -> None:
    resp = http.post("/generate", json={"prompt": "lighthouse " * 95_000, "max_length": 4})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"


def test_deeply_nested_json_is_a_400(http: httpx.Client) -> None:
    nested = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    resp = http.post("/generate", content=nested, headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["message"]


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
def test_bodies_are_json_whatever_the_content_type(http: httpx.Client, content_type: str | None) -> None:
    # `curl URL -d '{...}'`, the seed's README example, sends application/x-www-form-urlencoded.
    headers = {"content-type": content_type} if content_type else {}
    ok = http.post("/generate", content=b'{"prompt": "Once upon a time", "max_length": 5}', headers=headers)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    bad = http.post("/generate", content=b"prompt=Once+upon+a+time", headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["message"]


def test_server_is_still_healthy_after_all_that(http: httpx.Client) -> None:
    assert http.get("/health").json()["status"] == "ok"
    assert http.post("/generate", json={"prompt": "Hello", "max_length": 3}).status_code == 200


def test_special_tokens_can_be_allowed_by_a_setting(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--allow-special-tokens")
    try:
        body = httpx.post(server.url + "/generate", json={"prompt": "<|im_end|>", "max_length": 1}, timeout=30).json()
    finally:
        stop_server(server)
    assert body["usage"]["prompt_tokens"] == 1


def test_docs_load_no_third_party_script(http: httpx.Client) -> None:
    for path, asset in (("/docs", "/docs-assets/swagger-ui-bundle.js"), ("/redoc", "/docs-assets/redoc.standalone.js")):
        page = http.get(path).text
        assert asset in page and "cdn.jsdelivr.net" not in page and "fonts.googleapis.com" not in page
        assert http.get(asset).status_code == 200


def test_a_forged_newline_stays_inside_one_json_log_line(secured: LiveServer) -> None:
    httpx.get(secured.url + "/nope%0a%7B%22level%22:%22info%22,%22message%22:%22forged%22%7D", timeout=10)
    deadline = time.monotonic() + 5
    while not (lines := [line for line in secured.log().splitlines() if "nope" in line]):
        assert time.monotonic() < deadline, "no log line for the request"  # the line follows the answer
        time.sleep(0.05)
    assert len(lines) == 1
    assert json.loads(lines[0])["path"] == '/nope\n{"level":"info","message":"forged"}'
