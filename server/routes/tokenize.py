"""llama-server's ``POST /tokenize`` and ``POST /detokenize``, same request and answer shapes; ``/tokenize`` also
answers vLLM's shape (``prompt`` or chat ``messages`` in, ``tokens``, ``count``, ``max_model_len`` out), which
vllm-router's cache_aware policy asks each replica for."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from server.deps import ServiceDep
from server.engine.core import EngineState
from server.engine.llama import LlamaModel
from server.errors import ERROR_RESPONSES, bad_request, unavailable
from server.openai_protocol import ChatMessage
from server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenPiece,
    VllmTokenizeRequest,
    VllmTokenizeResponse,
)
from server.serving import GenerationService
from server.tools import template_messages

router = APIRouter(tags=["tokenize"])


def _model(service: GenerationService) -> LlamaModel:
    model = service.engine.model
    if model is None or service.engine.state is not EngineState.READY:
        raise unavailable(service.engine.not_ready_reason())
    return model


def _piece(model: LlamaModel, token: int) -> str | list[int]:
    data = model.token_to_piece(token, special=True)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)


@router.post("/tokenize", response_model=TokenizeResponse | VllmTokenizeResponse, responses=ERROR_RESPONSES,
             summary="Tokenize text with the served model's vocabulary")
async def tokenize(body: TokenizeRequest | VllmTokenizeRequest, service: ServiceDep
                   ) -> TokenizeResponse | VllmTokenizeResponse:
    """Admitted as a prompt is (a text that cannot fit in a slot's context is refused before it is tokenized);
    tokenizing and building the pieces run off the event loop."""
    model = _model(service)
    if isinstance(body, VllmTokenizeRequest):
        return await _vllm_tokenize(body, service)
    tokens = await service.tokenize(body.content, add_special=body.add_special, parse_special=body.parse_special,
                                    param="content")
    if len(tokens) > service.engine.slot_ctx:  # as a prompt would be, so the answer stays small
        raise bad_request(f"the content has {len(tokens)} tokens; at most {service.engine.slot_ctx} (a slot's "
                          "context) are tokenized at once", param="content", code="context_length_exceeded")
    if body.with_pieces:
        pieces = await asyncio.to_thread(lambda: [TokenPiece(id=t, piece=_piece(model, t)) for t in tokens])
        return TokenizeResponse(tokens=pieces)
    return TokenizeResponse(tokens=tokens)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES,
             summary="Turn token ids back into text")
async def detokenize(body: DetokenizeRequest, service: ServiceDep) -> DetokenizeResponse:
    model = _model(service)
    limit = service.engine.slot_ctx
    if len(body.tokens) > limit:
        raise bad_request(f"{len(body.tokens)} tokens given; at most {limit} (a slot's context) are detokenized at "
                          "once", param="tokens", code="context_length_exceeded")
    bad = next((t for t in body.tokens if not 0 <= t < model.n_vocab), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary (0..{model.n_vocab - 1})", param="tokens",
                          code="invalid_value")
    # Control tokens are written as their text, as llama-server does.
    data = await asyncio.to_thread(lambda: b"".join(model.token_to_piece(t, special=True) for t in body.tokens))
    return DetokenizeResponse(content=data.decode("utf-8", "replace"))


async def _vllm_tokenize(body: VllmTokenizeRequest, service: GenerationService) -> VllmTokenizeResponse:
    """A prompt's tokens as the completions route makes them, or chat messages' as the chat route renders them."""
    if body.messages is not None:
        try:
            messages = [ChatMessage.model_validate(m) for m in body.messages]
        except ValueError as exc:
            raise bad_request(f"messages: {exc}", param="messages", code="invalid_value") from exc
        native = (await asyncio.to_thread(service.chat_formatter)).accepts_tools
        tokens = await service.chat_tokens(template_messages(messages, [], native))
    else:
        tokens = await service.tokenize(body.prompt or "", add_special=body.add_special_tokens)
    return VllmTokenizeResponse(count=len(tokens), max_model_len=service.engine.slot_ctx, tokens=tokens)
