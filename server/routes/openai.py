"""The OpenAI-compatible API, served by the same engine as ``/generate``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.deps import EmbeddingsDep, ServiceDep
from server.embeddings import EmbeddingService
from server.errors import ERROR_RESPONSES, APIError, ErrorResponse, bad_request
from server.openai_protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingFields,
)
from server.openai_serving import serve_chat, serve_completion
from server.openapi_sse import event_stream
from server.security import cache_scope
from server.serving import GenerationService

router = APIRouter(prefix="/v1", tags=["openai"])

RESPONSES: dict[int | str, dict[str, object]] = {
    **ERROR_RESPONSES,
    404: {"model": ErrorResponse, "description": "Unknown model"},
    200: event_stream("With `stream: true`: OpenAI's server-sent events, chunks as JSON, the last `[DONE]`.", None),
}


def known_model(name: str, service: GenerationService) -> bool:
    """Any name is accepted while one model is served (clients hard-code 'gpt-3.5-turbo' and the like); with
    STRICT_MODEL_NAME only the served name and its aliases."""
    return not service.settings.strict_model_name or name in (service.model_name,
                                                               *service.settings.served_model_name)


def _check(body: SamplingFields, service: GenerationService) -> None:
    if body.model is not None and not known_model(body.model, service):
        raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{service.model_name}'",
                       type="invalid_request_error", param="model", code="model_not_found")
    problem = body.unsupported()
    if problem is not None:
        raise bad_request(problem[1], param=problem[0], code="unsupported_parameter")


def _build_options(http_request: Request, service: GenerationService) -> dict[str, object]:
    """Options of ``service.build`` that depend on who asks: whose cached prompt prefixes a request may reuse."""
    scope = cache_scope(http_request, service.settings)
    return {"cache_prompt": scope is not None, "cache_scope": scope or ""}


def _cards(service: GenerationService, embeddings: EmbeddingService) -> list[ModelCard]:
    """The chat model, and the embedding model beside it when one is served."""
    cards = [ModelCard(id=service.model_name, created=service.created)]
    if embeddings.served and embeddings.model_name != service.model_name:
        cards.append(ModelCard(id=embeddings.model_name, created=service.created))
    return cards


@router.get("/models", response_model=ModelList)
async def list_models(service: ServiceDep, embeddings: EmbeddingsDep) -> ModelList:
    return ModelList(data=_cards(service, embeddings))


@router.get("/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def get_model(model_id: str, service: ServiceDep, embeddings: EmbeddingsDep) -> ModelCard:
    for card in _cards(service, embeddings):
        if model_id == card.id or (card.id == service.model_name and model_id in service.settings.served_model_name):
            return card
    raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")


@router.post("/completions", response_model=Completion, responses=RESPONSES)
async def completions(body: CompletionRequest, request: Request, service: ServiceDep) -> Completion | Response:
    _check(body, service)
    prompt = body.prompt_value()
    return await serve_completion(service, body, prompt, request, _build_options(request, service))


@router.post("/chat/completions", response_model=ChatCompletion, responses=RESPONSES)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, service: ServiceDep
) -> ChatCompletion | Response:
    _check(body, service)
    return await serve_chat(service, body, request, _build_options(request, service))
