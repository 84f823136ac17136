"""The routes of Ollama's native API (``/api/*``): thin, over :mod:`server.api.ollama.serving`.

Auth is the server's (``Authorization: Bearer``, which Ollama's clients send as a header), checked before any
route; every error is Ollama's ``{"error": "..."}`` (``server/errors.py`` chooses it by path). Ollama's clients
probe the server with ``HEAD /``: answered here, while ``GET /`` stays the playground for browsers.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse

from server.api.ollama.protocol import (
    ChatRequest,
    ChatResponse,
    EmbedRequest,
    EmbedResponse,
    LegacyEmbeddingRequest,
    LegacyEmbeddingResponse,
    OllamaErrorResponse,
    OllamaGenerateRequest,
    OllamaGenerateResponse,
    OllamaModelList,
    RunningList,
    ShowRequest,
    ShowResponse,
    VersionResponse,
)
from server.api.ollama.serving import NDJSON, check_model, model_entry, running_model, serve, show
from server.deps import EmbeddingsDep, ServiceDep
from server.embeddings import EmbeddingService, json_floats, off_loop_size
from server.errors import APIError
from server.security import cache_scope

router = APIRouter(prefix="/api", tags=["ollama"])
probe = APIRouter(include_in_schema=False)

# Clients compare this with the Ollama release that brought a feature (tools 0.3, JSON-schema `format` 0.5,
# tool calls streamed 0.8...) and turn features off below it: a release whose API this server serves all of.
OLLAMA_VERSION = "0.12.0"

ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": OllamaErrorResponse, "description": "Invalid request"},
    404: {"model": OllamaErrorResponse, "description": "Unknown model (with STRICT_MODEL_NAME)"},
    429: {"model": OllamaErrorResponse, "description": "All slots busy and the wait queue full; see Retry-After"},
    503: {"model": OllamaErrorResponse, "description": "Model not loaded yet, or shutting down"},
}
STREAM = {"description": "With `stream` true (the default): newline-delimited JSON, one object per token, the last "
          "with `done: true`; `{\"error\": ...}` after a failure.", "content": {NDJSON: {}}}


def _options(request: Request, service: ServiceDep) -> dict[str, object]:
    scope = cache_scope(request, service.settings)
    return {"cache_prompt": scope is not None, "cache_scope": scope or ""}


# With the playground off, GET / is Ollama's probe too, as Ollama answers it.
probe_get = APIRouter(include_in_schema=False)


@probe.head("/")
@probe_get.get("/")
async def ollama_probe() -> PlainTextResponse:
    """Ollama's clients check that a server runs with ``HEAD /`` (or ``GET /``)."""
    return PlainTextResponse("Ollama is running")


@router.get("/version", response_model=VersionResponse, summary="The Ollama API version served")
async def version() -> VersionResponse:
    return VersionResponse(version=OLLAMA_VERSION)


@router.get("/tags", response_model=OllamaModelList, responses=ERRORS, summary="The served model (Ollama's list)")
async def tags(service: ServiceDep) -> OllamaModelList:
    return OllamaModelList(models=[await asyncio.to_thread(model_entry, service)])


@router.get("/ps", response_model=RunningList, responses=ERRORS, summary="The loaded model")
async def ps(service: ServiceDep) -> RunningList:
    return RunningList(models=[await asyncio.to_thread(running_model, service)])


@router.post("/show", response_model=ShowResponse, responses=ERRORS, summary="The model's details and metadata")
async def show_model(body: ShowRequest, service: ServiceDep) -> ShowResponse:
    check_model(body.model_name(), service)
    return await asyncio.to_thread(show, service)


@router.post("/chat", response_model=ChatResponse, responses={**ERRORS, 200: STREAM}, summary="Chat (Ollama)")
async def chat(body: ChatRequest, request: Request, service: ServiceDep) -> Response:
    return await serve(service, body, request, _options(request, service))


@router.post("/generate", response_model=OllamaGenerateResponse, responses={**ERRORS, 200: STREAM},
             summary="Generate from a prompt (Ollama)")
async def generate(body: OllamaGenerateRequest, request: Request, service: ServiceDep) -> Response:
    return await serve(service, body, request, _options(request, service))


def _check_embedding_model(name: str, service: EmbeddingService) -> None:
    served = (service.model_name, *service.settings.served_model_name)
    if service.settings.strict_model_name and name.removesuffix(":latest") not in served:
        raise APIError(404, f"model '{name}' not found", type="not_found_error", param="model",
                       code="model_not_found")


@router.post("/embed", response_model=EmbedResponse, responses={**ERRORS, 501: {"model": OllamaErrorResponse}},
             summary="Embed texts (Ollama)")
async def embed(body: EmbedRequest, service: EmbeddingsDep) -> Response:
    _check_embedding_model(body.model, service)
    started = time.perf_counter_ns()
    inputs = [body.input] if isinstance(body.input, str) else body.input
    result = await service.embed(inputs, dimensions=body.dimensions)

    def answer() -> bytes:  # up to EMBEDDING_MAX_INPUTS vectors: many are written off the event loop
        return json.dumps({"model": body.model, "embeddings": [json_floats(v) for v in result.vectors],
                           "total_duration": time.perf_counter_ns() - started, "load_duration": 0,
                           "prompt_eval_count": result.prompt_tokens}).encode()
    content = await asyncio.to_thread(answer) if off_loop_size(result.vectors) else answer()
    return Response(content, media_type="application/json")


@router.post("/embeddings", response_model=LegacyEmbeddingResponse,
             responses={**ERRORS, 501: {"model": OllamaErrorResponse}}, summary="Embed one text (Ollama, legacy)")
async def embeddings(body: LegacyEmbeddingRequest, service: EmbeddingsDep) -> LegacyEmbeddingResponse:
    _check_embedding_model(body.model, service)
    result = await service.embed([body.prompt], param="prompt")
    return LegacyEmbeddingResponse(embedding=json_floats(result.vectors[0]))
