"""The routes of Anthropic's Messages API: thin, over :mod:`server.api.anthropic.serving`.

``anthropic-version`` and ``anthropic-beta`` headers and the ``?beta=true`` query (Claude Code sends them) are
accepted, never required. Auth is the server's (``x-api-key`` or ``Authorization: Bearer``, checked before any
route), and every error is answered in Anthropic's envelope (``server/errors.py`` chooses it by path).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response

from server.api.anthropic.protocol import (
    STREAM_EVENT_NAMES,
    STREAM_EVENTS,
    AnthropicErrorResponse,
    CountTokensRequest,
    CountTokensResponse,
    Message,
    MessageRequest,
    PromptFields,
)
from server.api.anthropic.serving import count_tokens, serve_messages
from server.deps import ServiceDep
from server.errors import APIError
from server.openapi_sse import event_stream
from server.routes.openai import known_model  # one rule for model names on every dialect
from server.security import cache_scope
from server.serving import GenerationService

router = APIRouter(prefix="/v1", tags=["anthropic"])

ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": AnthropicErrorResponse, "description": "Invalid request"},
    404: {"model": AnthropicErrorResponse, "description": "Unknown model (with STRICT_MODEL_NAME)"},
    429: {"model": AnthropicErrorResponse, "description": "All slots busy and the wait queue full; see Retry-After"},
    503: {"model": AnthropicErrorResponse, "description": "Model not loaded yet, or shutting down"},
}
STREAM_DOC = event_stream(
    "With `stream: true`: Anthropic's server-sent events (`message_start`, `ping`, `content_block_start`, "
    "`content_block_delta`, `content_block_stop`, `message_delta`, `message_stop`; `error` after a failure).",
    STREAM_EVENTS, STREAM_EVENT_NAMES)

VersionHeader = Annotated[str | None, Header(description="Accepted, not required.")]
BetaHeader = Annotated[str | None, Header(description="Accepted and ignored.")]
BetaQuery = Annotated[str | None, Query(description="Accepted and ignored (Claude Code sends `?beta=true`).")]


def _check_model(body: PromptFields, service: GenerationService) -> None:
    if body.model is not None and not known_model(body.model, service):
        raise APIError(404, f"model: {body.model} (this server serves '{service.model_name}')",
                       type="not_found_error", param="model", code="model_not_found")


@router.post("/messages", response_model=Message, responses={**ERRORS, 200: STREAM_DOC},
             summary="Create a message (Anthropic's Messages API)")
async def create_message(body: MessageRequest, request: Request, service: ServiceDep,
                         anthropic_version: VersionHeader = None, anthropic_beta: BetaHeader = None,
                         beta: BetaQuery = None) -> Response:
    _check_model(body, service)
    scope = cache_scope(request, service.settings)
    return await serve_messages(service, body, request, {"cache_prompt": scope is not None,
                                                         "cache_scope": scope or ""})


@router.post("/messages/count_tokens", response_model=CountTokensResponse, responses=ERRORS,
             summary="Count a message request's input tokens")
async def count_message_tokens(body: CountTokensRequest, service: ServiceDep, anthropic_version: VersionHeader = None,
                               anthropic_beta: BetaHeader = None, beta: BetaQuery = None) -> CountTokensResponse:
    _check_model(body, service)
    return await count_tokens(service, body)
