"""The seed's native API: ``POST /generate``, and llama-server's ``POST /infill`` (fill in the middle) answered the
same way: JSON or server-sent events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from sse_starlette import ServerSentEvent

from server.deps import ServiceDep
from server.engine.types import FinalEvent, FinishReason, RequestHandle, TokenEvent
from server.errors import ERROR_RESPONSES, ErrorDetail
from server.fim import FimText, fim_prompt
from server.openapi_sse import event_stream
from server.protocol import (
    DoneChunk,
    ErrorChunk,
    GenerateRequest,
    GenerateResponse,
    InfillRequest,
    InfillResponse,
    SamplingRequest,
    TimingsInfo,
    TokenChunk,
    UsageInfo,
)
from server.security import cache_scope
from server.serving import GenerationService
from server.sse import TokenEventSourceResponse

router = APIRouter(tags=["generate"])

STREAM_DOC = event_stream(
    "With `stream: true`: server-sent events. Each `token` event carries a TokenChunk, the last `done` event a "
    "DoneChunk; an error after the stream began comes as an `error` event (ErrorChunk).",
    [TokenChunk, DoneChunk, ErrorChunk], ["token", "done", "error"],
)

# 499 (client closed request) is only logged: the client is gone and reads nothing.
CLIENT_CLOSED = 499


def _finish_reason(final: FinalEvent) -> str:
    return "length" if final.finish_reason is FinishReason.LENGTH else "stop"


# vllm-router rewrites a /generate body into SGLang's shape (dropping max_length and temperature) and passes other
# paths through untouched: behind it, the seed's clients call /native/generate.
PASS_THROUGH_PATH = "/native/generate"


@router.post(PASS_THROUGH_PATH, response_model=GenerateResponse, include_in_schema=False)
@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={**ERROR_RESPONSES, 200: STREAM_DOC},
    summary="Generate a continuation of a prompt",
)
async def generate(body: GenerateRequest, request: Request, service: ServiceDep) -> GenerateResponse | Response:
    return await _serve(body, body.prompt, request, service, id_prefix="gen", logged=body.prompt)


@router.post(
    "/infill",
    response_model=InfillResponse,
    responses={**ERROR_RESPONSES, 200: STREAM_DOC},
    summary="Fill in the middle between a prefix and a suffix (llama-server's /infill)",
)
async def infill(body: InfillRequest, request: Request, service: ServiceDep) -> InfillResponse | Response:
    text = FimText(prefix=body.input_prefix, suffix=body.input_suffix, prompt=body.prompt,
                   extra=[(chunk.filename, chunk.text) for chunk in body.input_extra],
                   prefix_param="input_prefix", suffix_param="input_suffix")
    tokens = await fim_prompt(service, text, what="/infill", param=None)
    logged = body.model_dump(include={"input_prefix", "input_suffix", "input_extra", "prompt"})
    answer = await _serve(body, tokens, request, service, id_prefix="infill", logged=logged, rendered=True)
    if not isinstance(answer, GenerateResponse):
        return answer
    u = answer.usage
    return InfillResponse(**answer.model_dump(), content=answer.text, tokens_predicted=u.completion_tokens,
                          tokens_evaluated=u.prompt_tokens, tokens_cached=u.cached_tokens)


async def _serve(body: SamplingRequest, prompt: str | list[int], request: Request, service: GenerationService, *,
                 id_prefix: str, logged: object, rendered: bool = False) -> GenerateResponse | Response:
    """Build, submit and answer (or stream) one native request; ``rendered``: ``prompt`` is the server's own
    tokens (a fill-in-the-middle prompt, whose markers are control tokens)."""
    request_id = service.new_id(id_prefix)
    scope = cache_scope(request, service.settings)
    sampling = await asyncio.to_thread(body.to_sampling)  # a schema is converted off the event loop
    gen_request = await service.build(
        prompt,
        max_tokens=body.max_length,
        sampling=sampling,
        stop=body.stop_strings(),
        request_id=request_id,
        cache_prompt=body.cache_prompt and scope is not None,
        cache_scope=scope or "",
        ignore_eos=body.ignore_eos,
        grammar_param=body.grammar_param,
        speculative=body.speculative,
        rendered=rendered,
    )
    fields = service.log_fields(gen_request, logged)
    request.state.generation = fields
    handle = service.submit(gen_request)
    if body.stream:
        return TokenEventSourceResponse(_sse(service, handle, fields))
    final = await service.complete(handle, request.receive, fields)
    if final is None:  # the client went away; its request was cancelled
        return Response(status_code=CLIENT_CLOSED)
    return GenerateResponse(
        id=request_id,
        model=service.model_name,
        text=final.text,
        finish_reason=_finish_reason(final),  # type: ignore[arg-type]
        usage=UsageInfo.of(final),
        timings=TimingsInfo.of(final),
    )


def token_event(text: str) -> bytes:
    """A `token` event, encoded once here: it is the hot path of every stream (same bytes as
    ``ServerSentEvent(data=TokenChunk(text=text).model_dump_json(), event="token")``)."""
    payload = json.dumps(text, ensure_ascii=False).encode()
    return b'event: token\r\ndata: {"type":"token","text":' + payload + b"}\r\n\r\n"


async def _sse(service: GenerationService, handle: RequestHandle, fields: dict[str, object]
               ) -> AsyncIterator[ServerSentEvent | bytes]:
    async for event in service.stream(handle, fields):
        if isinstance(event, TokenEvent):
            if event.text:
                yield token_event(event.text)
        elif isinstance(event, FinalEvent):
            done = DoneChunk(
                id=handle.request.request_id,
                model=service.model_name,
                finish_reason=_finish_reason(event),  # type: ignore[arg-type]
                usage=UsageInfo.of(event),
                timings=TimingsInfo.of(event),
            )
            yield ServerSentEvent(data=done.model_dump_json(), event="done")
        else:
            error = ErrorChunk(error=ErrorDetail(message=event.message, code=event.code, type=event.type))
            yield ServerSentEvent(data=error.model_dump_json(), event="error")
