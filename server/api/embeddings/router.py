"""The route of OpenAI's embeddings API: thin, over :mod:`server.embeddings`. Auth is the server's; errors are
OpenAI's envelope; the answer's JSON (up to EMBEDDING_MAX_INPUTS vectors) is written off the event loop."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
from fastapi import APIRouter, Response

from server.api.embeddings.protocol import EmbeddingList, EmbeddingRequest
from server.deps import EmbeddingsDep
from server.embeddings import json_floats, off_loop_size
from server.errors import ERROR_RESPONSES, APIError, ErrorResponse

router = APIRouter(prefix="/v1", tags=["openai"])

RESPONSES: dict[int | str, dict[str, object]] = {
    **ERROR_RESPONSES,
    404: {"model": ErrorResponse, "description": "Unknown model (with STRICT_MODEL_NAME)"},
    501: {"model": ErrorResponse, "description": "No embedding model is served"},
}


@router.post("/embeddings", response_model=EmbeddingList, responses=RESPONSES)
async def embeddings(body: EmbeddingRequest, service: EmbeddingsDep) -> Response:
    if (body.model is not None and service.settings.strict_model_name
            and body.model not in (service.model_name, *service.settings.served_model_name)):
        raise APIError(404, f"The model '{body.model}' does not exist; this server embeds with "
                       f"'{service.model_name}'", param="model", code="model_not_found")
    result = await service.embed(body.inputs(), dimensions=body.dimensions)
    args = (result.vectors, body.encoding_format, service.model_name, result.prompt_tokens)
    content = await asyncio.to_thread(_body, *args) if off_loop_size(result.vectors) else _body(*args)
    return Response(content, media_type="application/json")


def _body(vectors: list[np.ndarray], encoding: str, model: str, prompt_tokens: int) -> bytes:
    if encoding == "base64":
        items: list[object] = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        items = [json_floats(v) for v in vectors]
    return json.dumps({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": item} for i, item in enumerate(items)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }).encode()
