"""The OpenAI-compatible API, served by the same engine as ``/generate``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel
from sse_starlette import ServerSentEvent

from server.deps import ServiceDep, require_api_key
from server.engine.types import FinalEvent, FinishReason, GenerationRequest, RequestHandle, TokenEvent
from server.errors import ERROR_RESPONSES, APIError, ErrorDetail, ErrorResponse, bad_request
from server.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
)
from server.openapi_sse import event_stream
from server.routes.native import CLIENT_CLOSED
from server.serving import GenerationService
from server.sse import TokenEventSourceResponse

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])

RESPONSES: dict[int | str, dict[str, object]] = {
    **ERROR_RESPONSES,
    404: {"model": ErrorResponse, "description": "Unknown model"},
    200: event_stream("With `stream: true`: OpenAI's server-sent events, chunks as JSON, the last `[DONE]`.", None),
}


def _finish(final: FinalEvent) -> str:
    return "length" if final.finish_reason is FinishReason.LENGTH else "stop"


def _usage(final: FinalEvent) -> Usage:
    u = final.usage
    return Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                 total_tokens=u.prompt_tokens + u.completion_tokens)


def _known_model(name: str, service: GenerationService) -> bool:
    """Any name is accepted while one model is served (clients hard-code 'gpt-3.5-turbo' and the like); with
    STRICT_MODEL_NAME only the served name and its aliases."""
    return not service.settings.strict_model_name or name in (service.model_name,
                                                               *service.settings.served_model_name)


def _check(body: SamplingFields, service: GenerationService) -> None:
    if not _known_model(body.model, service):
        raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{service.model_name}'",
                       type="invalid_request_error", param="model", code="model_not_found")
    problem = body.unsupported()
    if problem is not None:
        raise bad_request(problem[1], param=problem[0], code="unsupported_parameter")


async def _start(service: GenerationService, body: SamplingFields, prompt: str | list[int], max_tokens: int | None,
                 prefix: str, http_request: Request, logged_prompt: object) -> tuple[RequestHandle, dict[str, object]]:
    request = await service.build(
        prompt, max_tokens=max_tokens, sampling=body.to_sampling(), stop=body.stop_strings(),
        request_id=service.new_id(prefix), max_tokens_param="max_tokens",
    )
    fields = service.log_fields(request, logged_prompt)
    http_request.state.generation = fields
    return service.submit(request), fields


@router.get("/models", response_model=ModelList)
async def list_models(service: ServiceDep) -> ModelList:
    return ModelList(data=[ModelCard(id=service.model_name, created=service.created)])


@router.get("/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def get_model(model_id: str, service: ServiceDep) -> ModelCard:
    if model_id not in (service.model_name, *service.settings.served_model_name):
        raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
    return ModelCard(id=service.model_name, created=service.created)


@router.post("/completions", response_model=Completion, responses=RESPONSES)
async def completions(body: CompletionRequest, request: Request, service: ServiceDep) -> Completion | Response:
    _check(body, service)
    handle, fields = await _start(service, body, body.prompt_value(), body.max_tokens, "cmpl", request, body.prompt)
    created = int(time.time())
    req = handle.request
    if body.stream:
        def chunk(text: str, finish: str | None) -> BaseModel:
            return Completion(id=req.request_id, created=created, model=service.model_name,
                              choices=[CompletionChoice(text=text, finish_reason=finish)])  # type: ignore[arg-type]

        def usage_chunk(final: FinalEvent) -> BaseModel:
            return Completion(id=req.request_id, created=created, model=service.model_name, choices=[],
                              usage=_usage(final))

        return TokenEventSourceResponse(
            _openai_stream(service, handle, chunk, usage_chunk if body.include_usage else None, first=None,
                           fields=fields)
        )
    final = await service.complete(handle, request.is_disconnected, fields)
    if final is None:  # the client went away; its request was cancelled
        return Response(status_code=CLIENT_CLOSED)
    return Completion(
        id=req.request_id, created=created, model=service.model_name,
        choices=[CompletionChoice(text=final.text, finish_reason=_finish(final))],  # type: ignore[arg-type]
        usage=_usage(final),
    )


@router.post("/chat/completions", response_model=ChatCompletion, responses=RESPONSES)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, service: ServiceDep
) -> ChatCompletion | Response:
    _check(body, service)
    messages = body.template_messages()
    tokens = await service.chat_tokens(messages)
    handle, fields = await _start(service, body, tokens, body.limit(), "chatcmpl", request, messages)
    created = int(time.time())
    req: GenerationRequest = handle.request
    if body.stream:
        def chunk(text: str, finish: str | None) -> BaseModel:
            delta = ChatDelta(content=text) if finish is None else ChatDelta()
            return ChatCompletionChunk(id=req.request_id, created=created, model=service.model_name,
                                       choices=[ChatChunkChoice(delta=delta, finish_reason=finish)])  # type: ignore[arg-type]

        def usage_chunk(final: FinalEvent) -> BaseModel:
            return ChatCompletionChunk(id=req.request_id, created=created, model=service.model_name, choices=[],
                                       usage=_usage(final))

        first = ChatCompletionChunk(id=req.request_id, created=created, model=service.model_name,
                                    choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])
        return TokenEventSourceResponse(
            _openai_stream(service, handle, chunk, usage_chunk if body.include_usage else None, first=first,
                           fields=fields)
        )
    final = await service.complete(handle, request.is_disconnected, fields)
    if final is None:  # the client went away; its request was cancelled
        return Response(status_code=CLIENT_CLOSED)
    return ChatCompletion(
        id=req.request_id, created=created, model=service.model_name,
        choices=[ChatChoice(message=AssistantMessage(content=final.text),
                            finish_reason=_finish(final))],  # type: ignore[arg-type]
        usage=_usage(final),
    )


async def _openai_stream(
    service: GenerationService,
    handle: RequestHandle,
    chunk: Callable[[str, str | None], BaseModel],
    usage_chunk: Callable[[FinalEvent], BaseModel] | None,
    first: BaseModel | None,
    fields: dict[str, object],
) -> AsyncIterator[ServerSentEvent]:
    """OpenAI's stream: data-only events, a last chunk with finish_reason, usage if asked, then [DONE]."""
    if first is not None:
        yield ServerSentEvent(data=first.model_dump_json(exclude_none=False))
    async for event in service.stream(handle, fields):
        if isinstance(event, TokenEvent):
            if event.text:
                yield ServerSentEvent(data=chunk(event.text, None).model_dump_json())
        elif isinstance(event, FinalEvent):
            yield ServerSentEvent(data=chunk("", _finish(event)).model_dump_json())
            if usage_chunk is not None:
                yield ServerSentEvent(data=usage_chunk(event).model_dump_json())
        else:
            error = ErrorResponse(error=ErrorDetail(message=event.message, code=event.code, type=event.type))
            yield ServerSentEvent(data=error.model_dump_json())
    yield ServerSentEvent(data="[DONE]")
