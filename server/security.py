"""API keys (compared in constant time, never logged, checked before a request's body is read), prompt-cache
scopes, and the checks that keep web pages from driving a server through a user's browser (allowed hosts,
cross-origin simple requests, and the headers that keep its pages out of frames)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import bad_request, send_error
from server.settings import Settings


def key_scope(key: str) -> str:
    """The prompt-cache scope of an API key: a digest, so the key itself is never kept beside the cache."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:32]


class KeyChecker:
    """Passes when no key is configured, or when the request carries one of the keys as
    ``Authorization: Bearer <key>`` (what the OpenAI SDK sends) or ``X-API-Key: <key>``."""

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

    def scope_of(self, headers: dict[bytes, bytes]) -> str | None:
        """The prompt-cache scope of a request with these headers ("" when no key is configured), or None when
        it carries no accepted key."""
        if not self._keys:
            return ""
        auth = headers.get(b"authorization", b"").decode("latin-1")
        presented = auth[7:].strip() if auth[:7].lower() == "bearer " else (
            headers.get(b"x-api-key", b"").decode("latin-1").strip())
        if not presented or not self.matches(presented):
            return None
        return key_scope(presented)


UNAUTHORIZED = "missing or invalid API key: send 'Authorization: Bearer <key>'"


class ApiKeyMiddleware:
    """The one place API keys are checked, before any route runs: a request without an accepted key is answered
    401 before a byte of its body is read or parsed (FastAPI reads and decodes the body before a route's
    dependencies run). The answer keeps the connection: uvicorn drops the unread rest of the body in its C
    parser, and closing on unread bytes would reset the connection before the client reads the 401.

    Every route needs a key but those ``public`` says not (:class:`PublicPaths`: probes, metrics, the playground,
    the docs). It records
    which key authenticated the request (as a digest, ``request.state.key_scope``), so that prompt prefixes are
    reused only between requests of the same key."""

    def __init__(self, app: ASGIApp, checker: KeyChecker, public: Callable[[Scope], bool]) -> None:
        self.app = app
        self.checker = checker
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            found = self.checker.scope_of(dict(scope["headers"]))
            if found is None and not self.public(scope):
                await send_error(send, 401, UNAUTHORIZED, type="authentication_error", code="invalid_api_key",
                                 headers=[(b"www-authenticate", b"Bearer")], path=scope["path"])
                return
            scope.setdefault("state", {})["key_scope"] = found or ""
        await self.app(scope, receive, send)


class PublicPaths:
    """The paths that answer without a key: exact paths (the operations router's, the playground's, the docs'),
    the prefixes of static mounts, and (method, path) pairs (Ollama's probe, ``HEAD /``). Anything else, a route
    added later or a path no route serves, needs one."""

    def __init__(self, exact: set[str], prefixes: tuple[str, ...],
                 methods: frozenset[tuple[str, str]] = frozenset()) -> None:
        self.exact = frozenset(exact)
        self.prefixes = prefixes
        self.methods = methods

    def __call__(self, scope: Scope) -> bool:
        path = scope["path"]
        return path in self.exact or path.startswith(self.prefixes) or (scope["method"], path) in self.methods


def _trusted(client: str, proxies: list[str]) -> bool:
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(p, strict=False) for p in proxies)


def cache_scope(request: Request, settings: Settings) -> str | None:
    """Which requests may reuse this one's cached prompt prefix: those with the same API key (and tenant
    header, when one is configured and the request comes from one of TRUSTED_PROXIES: a client that reaches the
    server directly cannot pick a tenant). None: no reuse at all (PROMPT_CACHE_SCOPE=off)."""
    if settings.prompt_cache_scope == "off":
        return None
    scope = str(getattr(request.state, "key_scope", ""))
    if settings.tenant_header:
        values = request.headers.getlist(settings.tenant_header)
        if len(values) > 1:
            raise bad_request(f"the {settings.tenant_header} header is given {len(values)} times; a gateway sets it "
                              "once", param=settings.tenant_header, code="invalid_header")
        client = request.client.host if request.client else ""
        if values and _trusted(client, settings.trusted_proxies):
            scope += "|tenant:" + values[0]
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
                             "clients use", code="invalid_host", path=scope["path"])
            return
        origin = headers.get(b"origin")
        if origin is not None and scope["method"] not in SAFE_METHODS and "*" not in self.cors_origins:
            media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if media_type != b"application/json" and origin.decode("latin-1") not in self.cors_origins:
                await send_error(send, 403, "a cross-origin request must send Content-Type: application/json",
                                 type="permission_error", code="cross_origin_refused", path=scope["path"])
                return
        await self.app(scope, receive, send)


# The playground loads only its own files; Swagger UI and ReDoc start from an inline script and style themselves
# inline. No page of this server may be framed (clickjacking the playground's "send" button).
PAGE_POLICY = ("default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
               "frame-ancestors 'none'")
DOCS_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
               "img-src 'self' data:; worker-src 'self' blob:; object-src 'none'; base-uri 'none'; "
               "frame-ancestors 'none'")
DOCS_PAGES = frozenset({"/docs", "/redoc"})


class PageHeadersMiddleware:
    """A Content-Security-Policy with ``frame-ancestors 'none'``, ``X-Frame-Options: DENY`` and ``nosniff`` on
    what a browser fetches with GET (the playground, the docs, their files). POSTs, and so every stream, pass
    untouched: no per-event work is added to the hot path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        policy = (DOCS_POLICY if scope["path"] in DOCS_PAGES else PAGE_POLICY).encode()

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in ((b"content-security-policy", policy), (b"x-frame-options", b"DENY"),
                                             (b"x-content-type-options", b"nosniff")) if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)
