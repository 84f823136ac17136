"""API keys (compared in constant time, never logged), prompt-cache scopes, and the checks that keep web pages
from driving a server through a user's browser (allowed hosts, cross-origin simple requests)."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import APIError, send_error
from server.settings import Settings


def key_scope(key: str) -> str:
    """The prompt-cache scope of an API key: a digest, so the key itself is never kept beside the cache."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:32]


class KeyChecker:
    """A FastAPI dependency: passes when no key is configured, or when the request carries one of the keys as
    ``Authorization: Bearer <key>`` (what the OpenAI SDK sends) or ``X-API-Key: <key>``.

    It records which key authenticated the request (as a digest, ``request.state.key_scope``), so that prompt
    prefixes are reused only between requests of the same key."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def matches(self, presented: str) -> bool:
        candidate = presented.encode("utf-8", "surrogatepass")
        found = False
        for key in self._keys:  # compare against every key, so timing does not tell which one nearly matched
            found |= hmac.compare_digest(candidate, key)
        return found

    async def __call__(self, request: Request) -> None:
        request.state.key_scope = ""
        if not self._keys:
            return
        auth = request.headers.get("authorization", "")
        presented = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not presented or not self.matches(presented):
            raise APIError(
                401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )
        request.state.key_scope = key_scope(presented)


def cache_scope(request: Request, settings: Settings) -> str | None:
    """Which requests may reuse this one's cached prompt prefix: those with the same API key (and tenant
    header, when one is configured). None: no reuse at all (PROMPT_CACHE_SCOPE=off)."""
    if settings.prompt_cache_scope == "off":
        return None
    scope = str(getattr(request.state, "key_scope", ""))
    if settings.tenant_header:
        scope += "|tenant:" + request.headers.get(settings.tenant_header, "")
    return scope


# Probes and Prometheus reach a pod by its IP, whatever ALLOWED_HOSTS says; these routes hold no user data.
PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _host_name(host: str) -> str:
    """The name part of a Host header value (``[::1]:8000`` -> ``[::1]``, ``Example.com:80`` -> ``example.com``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host: str, allowed: list[str]) -> bool:
    name = _host_name(host)
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern == "*" or name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


def served_hosts(settings: Settings) -> list[str]:
    """ALLOWED_HOSTS, plus the address the server listens on when it is a specific one (``--host 10.0.0.5``
    is reached as ``http://10.0.0.5:8000``; an address literal is no use to DNS rebinding)."""
    bound = settings.host.strip("[]")
    if bound in ("", "0.0.0.0", "::"):
        return list(settings.allowed_hosts)
    return [*settings.allowed_hosts, f"[{bound}]" if ":" in bound else bound]


class BrowserGuardMiddleware:
    """Refuses what a hostile web page could make a visitor's browser send:

    - a Host header not in ALLOWED_HOSTS (DNS rebinding: a page whose name resolves to 127.0.0.1 would
      otherwise read the answers, as same-origin);
    - a cross-origin "simple request": a POST carrying an ``Origin`` that is not a configured CORS origin, with
      a Content-Type other than ``application/json``. Browsers send those without a CORS preflight, and the
      API reads every body as JSON (so that ``curl -d`` works); a JSON Content-Type forces the preflight,
      which only configured origins pass. Clients that send no ``Origin`` (curl, SDKs) are not affected.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: list[str], cors_origins: list[str]) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.cors_origins = set(cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if scope["path"] not in PROBE_PATHS and not host_allowed(host, self.allowed_hosts):
            await send_error(send, 400, "this Host header is not served here; set ALLOWED_HOSTS to the names "
                             "clients use", code="invalid_host")
            return
        origin = headers.get(b"origin")
        if origin is not None and scope["method"] not in SAFE_METHODS and "*" not in self.cors_origins:
            media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if media_type != b"application/json" and origin.decode("latin-1") not in self.cors_origins:
                await send_error(send, 403, "a cross-origin request must send Content-Type: application/json",
                                 type="permission_error", code="cross_origin_refused")
                return
        await self.app(scope, receive, send)
