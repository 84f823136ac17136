"""llama-server's ``POST /tokenize`` and ``POST /detokenize``, same request and answer shapes."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from server.deps import ServiceDep
from server.engine.core import EngineState
from server.engine.llama import LlamaModel
from server.errors import ERROR_RESPONSES, bad_request, unavailable
from server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse, TokenPiece
from server.serving import GenerationService

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


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES,
             summary="Tokenize text with the served model's vocabulary")
async def tokenize(body: TokenizeRequest, service: ServiceDep) -> TokenizeResponse:
    """Admitted as a prompt is (a text that cannot fit in a slot's context is refused before it is tokenized);
    tokenizing and building the pieces run off the event loop."""
    model = _model(service)
    tokens = await service.tokenize(body.content, add_special=body.add_special, parse_special=body.parse_special,
                                    param="content")
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
