"""Bad input gets a 4xx with one JSON error envelope, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest


def assert_envelope(resp: httpx.Response, status: int, *, param: str | None = None, code: str | None = None) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return str(error["message"])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "hi", "max_length": "many"}, "max_length"),
        ({"prompt": "hi", "max_length": -5}, "max_length"),
        ({"prompt": "hi", "max_length": 0}, "max_length"),
        ({"prompt": "hi", "temperature": 9.5}, "temperature"),
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "seed": -1}, "seed"),
        ({"prompt": "hi", "stop": [""]}, "stop"),
        ({"prompt": "hi", "stop": ["x"] * 17}, "stop"),
        ({"prompt": "hi", "max_tokens": 5}, "max_tokens"),  # unknown fields are refused, not ignored
    ],
)
def test_invalid_fields_are_400_with_the_field_named(http: httpx.Client, body: dict[str, object], param: str) -> None:
    assert_envelope(http.post("/generate", json=body), 400, param=param, code="invalid_value")


def test_malformed_json_is_400(http: httpx.Client) -> None:
    resp = http.post("/generate", content=b'{"prompt": "hi",', headers={"content-type": "application/json"})
    assert_envelope(resp, 400)


def test_huge_max_length_is_refused_with_the_limit(http: httpx.Client) -> None:
    message = assert_envelope(http.post("/generate", json={"prompt": "hi", "max_length": 10**9}), 400,
                              param="max_length")
    assert "4096" in message


def test_prompt_longer_than_the_context_says_how_many_tokens(http: httpx.Client) -> None:
    prompt = "hello " * 3000  # 3000 tokens (plus or minus) against 2048 per slot
    message = assert_envelope(http.post("/generate", json={"prompt": prompt, "max_length": 10}), 400,
                              param="prompt", code="context_length_exceeded")
    assert "2048" in message and "tokens" in message
    n_tokens = int(message.split("the prompt has ")[1].split()[0])
    assert 2900 <= n_tokens <= 3100


def test_prompt_plus_max_length_over_the_context_is_refused(http: httpx.Client) -> None:
    prompt = "hello " * 1500
    message = assert_envelope(http.post("/generate", json={"prompt": prompt, "max_length": 1000}), 400,
                              param="max_length", code="context_length_exceeded")
    assert "lower max_length to at most" in message


def test_unknown_route_and_method_use_the_envelope(http: httpx.Client) -> None:
    assert_envelope(http.get("/nope"), 404)
    assert_envelope(http.get("/generate"), 405)


def test_server_still_serves_after_bad_input(http: httpx.Client) -> None:
    for body in ({"prompt": 1}, {"prompt": "x" * 20000, "max_length": 5}, {}):
        assert http.post("/generate", json=body).status_code == 400
    resp = http.post("/generate", json={"prompt": "Hello", "max_length": 5, "temperature": 0})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] >= 1
