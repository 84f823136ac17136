"""API keys for the generation routes, compared in constant time and never logged."""

from __future__ import annotations

import hmac

from fastapi import Request

from server.errors import APIError


class KeyChecker:
    """A FastAPI dependency: passes when no key is configured, or when the request carries one of the keys as
    ``Authorization: Bearer <key>`` (what the OpenAI SDK sends) or ``X-API-Key: <key>``."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def matches(self, presented: str) -> bool:
        candidate = presented.encode()
        found = False
        for key in self._keys:  # compare against every key, so timing does not tell which one nearly matched
            found |= hmac.compare_digest(candidate, key)
        return found

    async def __call__(self, request: Request) -> None:
        if not self._keys:
            return
        auth = request.headers.get("authorization", "")
        presented = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not presented or not self.matches(presented):
            raise APIError(
                401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )
