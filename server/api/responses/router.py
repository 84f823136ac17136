"""The route of OpenAI's Responses API: thin, over :mod:`server.api.responses.serving`.

Stateless (``previous_response_id`` and the other stored-state fields are refused with a 400, ``store`` is
accepted and nothing kept). Auth is the server's, checked before any route; errors are OpenAI's envelope, as on
every ``/v1`` route but Anthropic's.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.api.responses.protocol import STREAM_EVENT_NAMES, STREAM_EVENTS, ResponseRequest
from server.api.responses.protocol import Response as ResponseObject
from server.api.responses.serving import serve_responses
from server.deps import ServiceDep
from server.errors import ERROR_RESPONSES, APIError, ErrorResponse
from server.openapi_sse import event_stream
from server.routes.openai import known_model  # one rule for model names on every dialect
from server.security import cache_scope

router = APIRouter(prefix="/v1", tags=["openai"])

STREAM_DOC = event_stream(
    "With `stream: true`: the Responses API's server-sent events (`response.created`, `response.in_progress`, "
    "`response.output_item.added`, `response.content_part.added`, `response.output_text.delta`/`.done`, "
    "`response.content_part.done`, `response.function_call_arguments.delta`/`.done`, `response.output_item.done`, "
    "`response.completed` or `response.incomplete`; `error` then `response.failed` after a failure).",
    STREAM_EVENTS, STREAM_EVENT_NAMES)


@router.post("/responses", response_model=ResponseObject,
             responses={**ERROR_RESPONSES, 404: {"model": ErrorResponse, "description": "Unknown model"},
                        200: STREAM_DOC},
             summary="Create a response (OpenAI's Responses API, stateless)")
async def create_response(body: ResponseRequest, request: Request, service: ServiceDep) -> Response:
    if body.model is not None and not known_model(body.model, service):
        raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{service.model_name}'",
                       param="model", code="model_not_found")
    scope = cache_scope(request, service.settings)
    return await serve_responses(service, body, request, {"cache_prompt": scope is not None,
                                                          "cache_scope": scope or ""})
