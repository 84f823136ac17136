"""The route table, walked: every operation the API describes needs the API key but the operations router's, and
so does a path no route serves, so a route added later is closed unless it is made public on purpose.
In-process, no model loaded: the key is checked before any route runs, before the body is read."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.security import UNAUTHORIZED
from server.settings import Settings

KEY = "sk-route-table-9c41d07e"
APP = create_app(Settings(api_key=KEY))
# From the OpenAPI description FastAPI writes of the routers, not from the middleware's own table.
OPERATIONS = [(method.upper(), path, "operations" in op.get("tags", ()))
              for path, item in APP.openapi()["paths"].items() for method, op in item.items()]
PAGES = ["/", "/favicon.ico", "/docs", "/redoc", "/openapi.json", "/static/app.js", "/docs-assets/swagger-ui.css"]


@pytest.fixture(scope="module")
def client() -> TestClient:
    # Not entered as a context manager: the lifespan (and so the model) never starts.
    return TestClient(APP, base_url="http://localhost", raise_server_exceptions=False)


def test_the_description_has_the_api_and_the_operations() -> None:
    closed = {path for _, path, public in OPERATIONS if not public}
    assert {"/generate", "/v1/completions", "/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens",
            "/tokenize", "/detokenize"} <= closed
    assert {"/api/chat", "/api/generate", "/api/show", "/api/tags", "/api/ps", "/api/version"} <= closed
    assert {path for _, path, public in OPERATIONS if public} == {"/health", "/ready", "/metrics", "/info", "/get_load"}


@pytest.mark.parametrize(("method", "path"), [(m, p) for m, p, public in OPERATIONS if not public])
def test_every_api_route_refuses_a_request_without_the_key(client: TestClient, method: str, path: str) -> None:
    url = re.sub(r"\{[^}]+\}", "x", path)
    resp = client.request(method, url, content=b"{not json")
    assert resp.status_code == 401, resp.text  # not 400: the body was never parsed
    if path.startswith("/v1/messages"):  # Anthropic's routes answer in Anthropic's envelope
        assert resp.json()["error"]["type"] == "authentication_error" and resp.json()["type"] == "error"
    elif path.startswith("/api/"):  # Ollama's routes answer in its shape: {"error": "message"}
        assert resp.json() == {"error": UNAUTHORIZED}
    else:
        assert resp.json()["error"]["code"] == "invalid_api_key"
    assert resp.headers["www-authenticate"] == "Bearer"
    assert client.request(method, url, headers={"Authorization": "Bearer " + KEY[:-1]}).status_code == 401
    # With the key the route is reached: whatever it answers (no model is loaded here), it is not 401.
    assert client.request(method, url, content=b"{not json", headers={"X-API-Key": KEY}).status_code != 401


@pytest.mark.parametrize("path", PAGES + [p for _, p, public in OPERATIONS if public])
def test_the_probes_and_pages_need_no_key(client: TestClient, path: str) -> None:
    assert client.get(path).status_code != 401


def test_ollamas_probe_is_public_by_method_alone() -> None:
    """HEAD / (and GET / with the playground off) answer Ollama's probe without a key; POST / still needs one."""
    bare = TestClient(create_app(Settings(api_key=KEY, ui=False)), base_url="http://localhost")  # no lifespan
    assert bare.head("/").status_code == 200
    assert bare.get("/").status_code == 200 and bare.get("/").text == "Ollama is running"
    assert bare.post("/").status_code == 401


@pytest.mark.parametrize("path", ["/api/anything", "/v2/anything", "/healthz", "/health/", "/static"])
def test_a_path_no_route_serves_needs_the_key_too(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
