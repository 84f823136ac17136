"""The wire shapes of OpenAI's ``POST /v1/embeddings``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EmbeddingRequest(BaseModel):
    # Fields this server does not know are ignored (clients send `user` and the like); known ones keep their type.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = Field(default=None, description="The embedding model's id (see GET /v1/models); unset: it.")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, a list of texts, a list of token ids or a list of such lists (ids of the embedding "
        "model's own vocabulary, used as given). Each input is embedded whole: one longer than the model's context "
        "is refused, never cut.")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="`base64`: each vector as little-endian float32 bytes (the openai SDK's "
        "default, decoded by it).")
    dimensions: int | None = Field(
        default=None, ge=1, description="Cut each vector to this width and normalise it again; only for widths the "
        "model was trained for (EMBEDDING_DIMENSIONS).")
    user: str | None = None

    def inputs(self) -> list[str] | list[list[int]]:
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and isinstance(value[0], int):
            return [value]  # type: ignore[list-item]
        return value  # type: ignore[return-value]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="The L2-normalised vector, or its base64 float32 bytes.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
