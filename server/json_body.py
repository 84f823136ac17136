"""Request bodies of the API are JSON whatever Content-Type says.

`curl URL -d '{...}'` (the seed's README example) sends `application/x-www-form-urlencoded`; FastAPI would then
not parse the body at all. Like llama.cpp's own server, this one reads every POST body of its API as JSON: a
body that is not JSON gets the usual 400."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

# /api/: Ollama's clients send JSON without a content type at times.
JSON_PREFIXES = ("/generate", "/native/generate", "/infill", "/v1/", "/tokenize", "/detokenize", "/api/")


class JsonBodyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith(JSON_PREFIXES):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
